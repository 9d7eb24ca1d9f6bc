"""Finding a model directory: a local path, an installed package's folder, or the Hub."""

from __future__ import annotations

import importlib.util
import os

from peftjax.models._safetensors import CheckpointError

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken",
                "*.jinja"]


def _package_dir(spec: str) -> str:
    """``pkg:NAME[/SUB/PATH]`` -> the folder inside installed package NAME (not imported)."""
    name, _, sub = spec[len("pkg:"):].partition("/")
    module = name.replace("-", "_")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise CheckpointError(f"{spec!r}: no installed package {module!r}. Install it "
                              f"(pip install {name}) or pass a directory.")
    root = os.path.join(list(found.submodule_search_locations)[0], sub)
    if os.path.isfile(os.path.join(root, "config.json")):
        return root
    ggufs = sorted(f for f in os.listdir(root) if f.endswith(".gguf")) if os.path.isdir(root) else []
    if len(ggufs) == 1:
        return gguf_to_hf(os.path.join(root, ggufs[0]))
    candidates = sorted({os.path.dirname(os.path.join(d, f)) for d, _, files in os.walk(root)
                         for f in files if f == "config.json"})
    if len(candidates) == 1:
        return candidates[0]
    raise CheckpointError(f"{spec!r}: expected one folder with a config.json under {root}; found "
                          f"{candidates or 'none'}. Name the folder: pkg:{name}/SUBFOLDER.")


def gguf_to_hf(gguf_path: str, *, cache_dir: str | None = None) -> str:
    """Converts a GGUF file once into a Hugging Face directory (f32 safetensors + tokenizer) under
    ``$PEFTJAX_CACHE/gguf`` and returns it. transformers dequantises the GGUF weights (this needs
    ``torch`` and ``gguf``); a GGUF-loaded model refuses ``save_pretrained``, so its state dict is
    copied into a fresh model of the same config, which is saved."""
    root = cache_dir or os.path.join(os.environ.get("PEFTJAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "peftjax"), "gguf")
    out = os.path.join(root, os.path.splitext(os.path.basename(gguf_path))[0])
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    from peftjax._files import cache_lock
    with cache_lock(out + ".lock"):  # another process may be converting it right now
        if os.path.isfile(os.path.join(out, "model.safetensors")):
            return out
        return _convert_gguf(gguf_path, out)


def _convert_gguf(gguf_path: str, out: str) -> str:
    try:
        import torch
        import transformers as T
    except ImportError as e:
        raise CheckpointError(f"{gguf_path}: converting a GGUF file needs torch, transformers and "
                              f"gguf (pip install torch gguf); {e}") from e
    import shutil
    import warnings
    folder, name = os.path.split(gguf_path)
    print(f"Converting {name} to a Hugging Face checkpoint in {out} (once)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = T.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = T.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        cfg = src.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        fresh = type(src)(cfg)
        fresh.load_state_dict(src.state_dict())
        tmp = out + f".tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        fresh.eval().save_pretrained(tmp)
        tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_model_dir(name_or_path: str, *, revision: str | None = None,
                      config_only: bool = False) -> str:
    """Returns a local directory holding ``config.json`` for ``name_or_path``.

    Accepts a local directory, ``pkg:PACKAGE[/SUBDIR]`` (a folder shipped inside an installed
    Python package, for offline defaults; a folder holding one ``.gguf`` file is converted once,
    see :func:`gguf_to_hf`), or a Hugging Face Hub repo id (downloaded with
    ``huggingface_hub.snapshot_download``; only config, tokenizer and safetensors files, or only
    ``config.json`` with ``config_only``).
    """
    if name_or_path.startswith("pkg:"):
        return _package_dir(name_or_path)
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: directory has no config.json; expected a Hugging "
                                  "Face model directory (config.json + *.safetensors).")
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: is a file; pass the directory that holds config.json.")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or os.sep == "\\"
    if looks_local:
        raise CheckpointError(f"{name_or_path}: no such directory.")
    try:
        import huggingface_hub
        return huggingface_hub.snapshot_download(name_or_path, revision=revision,
                                                 allow_patterns=["config.json"] if config_only
                                                 else HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise CheckpointError(
            f"{name_or_path!r} is not a local directory and could not be fetched from the Hugging "
            f"Face Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Pass a "
            "local directory, pkg:PACKAGE/SUBDIR, or check the repo id and your network/token."
        ) from e
