"""Where real models load from: `--model-path` (`ServeConfig.model_path`, `WorkerSpec.model_path`).

One value names the checkpoints of every real model a server (or `profile`, `replay`) loads, so
that an image model and a video model co-serve from real weights:

- `MODEL=DIR[,MODEL=DIR...]`: each model's diffusers checkpoint directory;
- a diffusers checkpoint directory (it has `model_index.json`): the one real model;
- any other directory: one checkpoint directory per model inside it, named after the model
  (`/models/sd3-medium`, `/models/wan2.1-14b`).

Resolved on the workers (`models.presets.load_preset`), and checked before any starts
(`check_model_dirs`), so a wrong path is an error naming it at once rather than a worker that
fails to load.  No torch here: the command line imports it.
"""

from __future__ import annotations

from pathlib import Path

from .catalog import MODELS

MODEL_PATH_HELP = ("where real models load from (nothing is downloaded): a diffusers checkpoint "
                   "directory (one real model), a directory holding one per model named after "
                   "it (DIR/sd3-medium, DIR/wan2.1-14b, ...), or MODEL=DIR[,MODEL=DIR...]")


def model_dir(name: str, model_path: str | None) -> Path:
    """The checkpoint directory of real model `name` under `model_path` (see the module); a
    ValueError names what is missing."""
    if not model_path:
        raise ValueError(f"model={name!r} needs --model-path DIR (a local diffusers checkpoint; "
                         f"nothing is downloaded)")
    if "=" in model_path:
        pairs = [part.partition("=") for part in model_path.split(",") if part.strip()]
        dirs = {m.strip(): d.strip() for m, _, d in pairs}
        if name not in dirs:
            raise ValueError(f"--model-path {model_path!r}: no directory for {name} (its "
                             f"MODEL=DIR pairs name {', '.join(dirs)})")
        return Path(dirs[name])
    root = Path(model_path)
    if root.is_dir() and not (root / "model_index.json").is_file() and (root / name).is_dir():
        return root / name
    return root


def check_model_dirs(names, model_path: str | None, local: bool = True) -> None:
    """Before any worker starts: every real model among `names` has a directory of its own
    (`local`: one that is here, with `model_index.json`; a Ray head may not hold the checkpoints
    its workers load).  A ValueError names the model and the path."""
    real = [n for n in names if n in MODELS and not MODELS[n].tiny]
    seen: dict[Path, str] = {}
    for name in real:
        d = model_dir(name, model_path)
        if d in seen:
            raise ValueError(f"--model-path {model_path!r}: {seen[d]} and {name} would both load "
                             f"{d}; give MODEL=DIR pairs, or a directory holding one checkpoint "
                             f"directory per model named after it")
        seen[d] = name
        if local and not (d / "model_index.json").is_file():
            raise ValueError(f"--model-path {model_path!r}: {d} is not a diffusers checkpoint "
                             f"directory for {name} (no model_index.json)")
