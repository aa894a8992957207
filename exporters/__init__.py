"""Exporters: one package per target format, each exposing ``export(model_dir, out_dir, config)``."""

from dataclasses import fields


def coerce_options(cls, value, what: str):
    """An exporter's options dataclass from itself, a recipe's plain dict, or None (defaults);
    unknown keys are refused with the known ones listed. ``what`` names the options in messages."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown {what} option(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(map(repr, known))}")
        return cls(**value)
    raise TypeError(f"{what} config must be a {cls.__name__}, a dict or None, got {type(value).__name__}")


BROWSER_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def require_tokenizer_files(model_dir, what: str) -> None:
    """Refuse a model folder without the files a browser bundle tokenises and chats with."""
    from pathlib import Path

    from toolchain.core.errors import PreflightError

    missing = [n for n in BROWSER_MODEL_FILES if not (Path(model_dir) / n).is_file()]
    if missing:
        raise PreflightError(f"{what} export: {model_dir} has no {', '.join(missing)}: the browser tokenises with "
                             f"the model's own tokenizer files (fix: export from a folder saved with its tokenizer)")



def place_bundle(tmp, out_dir, bundle: dict, bundle_file: str = "bundle.json") -> None:
    """Move a bundle built in ``tmp`` into ``out_dir``, then write ``bundle_file`` last: its
    presence means the bundle is complete."""
    import os
    import shutil
    from pathlib import Path

    from toolchain.core.files import write_json_atomic

    tmp, out_dir = Path(tmp), Path(out_dir)
    (tmp / bundle_file).unlink(missing_ok=True)
    for name in sorted(p.name for p in tmp.iterdir()):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    write_json_atomic(out_dir / bundle_file, bundle)
