"""docs/config.md and the config lines of `--help` come from configs/base.py's comments
(dvar_jax/config_reference.py): the committed file is current, every key is described, and the
comment rules hold."""

import textwrap

from dvar_jax import config_reference as ref
from dvar_jax.configs.base import get_config


def _leaves(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if hasattr(value, "items"):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_committed_docs_config_md_is_current():
    assert ref.DOC_PATH.read_text() == ref.render_markdown(), (
        "docs/config.md is out of date: run `python -m dvar_jax.config_reference --write`")


def test_every_key_of_base_py_is_described():
    missing = ref.undocumented_keys()
    assert not missing, ("keys of configs/base.py with no comment above them or at the end of "
                         f"their line (add one): {missing}")


def test_keys_defaults_and_types_are_the_config_s():
    keys = ref.config_keys()
    leaves = _leaves(get_config())
    assert sorted(k.key for k in keys) == sorted(leaves)
    assert len({k.key for k in keys}) == len(keys)
    for k in keys:
        assert k.default == leaves[k.key] or (k.default is None and leaves[k.key] is None), k.key
    types = {k.key: k.type_name for k in keys}
    assert types["data.epochs"] == "float" and types["model.d_model"] == "int"
    assert types["objective"] == "str" and types["mesh.rules"] == "tuple"


def test_every_key_has_a_row_in_its_section():
    text = ref.render_markdown()
    for k in ref.config_keys():
        assert f"| `{k.key}` | {k.type_name} | `" in text, k.key
    for section in {k.section for k in ref.config_keys()} - {""}:
        assert f"\n## `{section}`\n" in text, section


SOURCE = textwrap.dedent('''\
    from ml_collections import ConfigDict


    def get_config():
        c = ConfigDict()
        # The first key,
        # over two lines.
        c.alpha = 1
        c.beta = 2  # beta's own
        c.gamma = 3

        c.delta = 4  # delta alone
        c.epsilon = 5

        # About the section.
        c.sub = ConfigDict()
        # Shared by three keys.
        c.sub.x, c.sub.y = 1, 2
        c.sub.z = (
            1,
            2,
        )
        c.sub.w = 0.5  # w
        return c
''')


def test_comment_rules():
    d = ref.parse_descriptions(SOURCE)
    assert d == {
        "alpha": "The first key, over two lines.",  # block, lines joined
        "beta": "beta's own",  # the next line of a group: its own comment wins
        "gamma": "The first key, over two lines.",  # ... else the group's block
        "delta": "delta alone",  # a blank line starts a new group (no block)
        "epsilon": "",  # undocumented: no block, no comment of its own
        "sub.x": "Shared by three keys.",  # tuple targets share the description
        "sub.y": "Shared by three keys.",
        "sub.z": "Shared by three keys.",  # a multi-line statement is one line of the group
        "sub.w": "w",
    }
    assert ref.parse_sections(SOURCE) == {"sub": "About the section."}


def test_markdown_escapes_table_cells():
    key = ref.ConfigKey("model.dtype", "str", "float32", '"float32" | "bfloat16"')
    text = ref.render_markdown([key])
    assert '| `model.dtype` | str | `\'float32\'` | "float32" \\| "bfloat16" |' in text


def test_write_and_check(tmp_path, capsys):
    out = tmp_path / "config.md"
    assert ref.main(["--check", "--output", str(out)]) == 1  # missing
    assert "is not current" in capsys.readouterr().err
    assert ref.main(["--write", "--output", str(out)]) == 0
    assert out.read_text() == ref.render_markdown()
    assert ref.main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text() + "edited by hand\n")
    assert ref.main(["--check", "--output", str(out)]) == 1
    assert ref.main([]) == 0
    assert capsys.readouterr().out == ref.render_markdown()
