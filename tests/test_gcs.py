"""Run folders on gs://, against a GCS emulator on 127.0.0.1 (tests/gcs_emulator.py): training,
resuming, damaged checkpoints, sweeps, leases, errors before training, token stores."""



from dvar_jax.configs.recipes import tiny_config
from dvar_jax.run_dir import RunDir


def test_train_writes_every_artifact_to_gcs(gcs_bucket, text_data_cfg):
    from dvar_jax.train import train

    cfg = tiny_config("ar", text_data_cfg.path, text_data_cfg.cache_dir)
    workdir = f"{gcs_bucket}/runs/ar"
    summary = train(cfg, workdir, progress=False)
    assert summary.completed
    run = RunDir(workdir)
    assert run.finished_summary()["steps"] == summary.steps
    assert run.saved_config().objective == "ar"
    assert [r["step"] for r in run.read_metrics("eval")][-1] == summary.steps
    assert run.checkpoint_steps()[-1] == summary.steps
    assert any(p.name.startswith("events.out.tfevents") for p in run.tensorboard_dir.iterdir())
    assert run.holder() is None and not run.lock_path.exists()  # the lease was released
