"""Write plain HF model dirs from a (possibly ZeRO-3 sharded, possibly LoRA) model, atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch

from .distributed import barrier


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, is_main: bool) -> Iterator[Path]:
    """Yield a temp dir beside `out_dir`; on success it replaces `out_dir` in one rename.

    A failed write (an exception: a full disk) removes the temp dir and keeps the previous `out_dir`; a
    killed process leaves only a `.NAME.tmp-PID` dir, which the next export beside it removes.
    """
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if is_main:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp_dirs(out: Path) -> None:
    """Delete `.NAME.tmp-PID` / `.NAME.old-PID` dirs left by exports whose process is gone (a crash)."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for path in out.parent.glob(pattern):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=False)
    for name, buf in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield name, buf


def _lora_kind(module: torch.nn.Module) -> str | None:
    """'lora' for a peft LoRA layer, 'saved' for a modules_to_save wrapper, else None."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover
        return None
    if isinstance(module, LoraLayer):
        return "lora"
    if isinstance(module, ModulesToSaveWrapper):
        return "saved"
    return None


def _merged_lora_tensors(module, prefix: str) -> dict[str, torch.Tensor]:
    """W + delta of every active adapter (peft's own delta math, which knows fan_in_fan_out)."""
    base = module.get_base_layer()
    weight = base.weight.detach().clone()
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight += module.get_delta_weight(adapter).to(weight.dtype)
    out = {f"{prefix}weight": weight}
    if getattr(base, "bias", None) is not None:
        out[f"{prefix}bias"] = base.bias.detach().clone()
    return out


def merged_tensors(
    model: torch.nn.Module, merge_lora: bool, is_main: bool
) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, trainable) of every weight of `model`, gathering ZeRO-3 shards module by module.

    Collective: every rank must iterate it to the end; tensors are yielded on the main rank only (views of
    gathered storage: copy what you keep before the next item). With `merge_lora`, names are the base
    model's and LoRA layers yield W + delta; otherwise peft's own names. `trainable` tells whether the
    tensor can change in training (LoRA-merged weights can). Gathering one module at a time bounds the
    extra memory to the largest module.
    """
    from chatforge.models.lora import is_peft_model

    peft = is_peft_model(model)
    root = model.get_base_model() if (peft and merge_lora) else model
    skip: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        prefix = f"{name}." if name else ""
        kind = _lora_kind(module) if merge_lora else None
        if kind == "saved":
            module = module.modules_to_save[module.active_adapters[0]]
        params = list(module.parameters(recurse=kind is not None))
        trainable = any(p.requires_grad for p in params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if is_main:
                yield from ((k, v, trainable) for k, v in _module_tensors(module, kind, prefix))
        if kind is not None:
            skip.append(name)


def _module_tensors(module, kind: str | None, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if kind == "lora":
        yield from _merged_lora_tensors(module, prefix).items()
    elif kind == "saved":
        yield from ((f"{prefix}{k}", v.detach()) for k, v in module.state_dict().items())
    else:
        yield from ((f"{prefix}{k}", v.detach()) for k, v in _own_tensors(module))


def gathered_state_dict(model: torch.nn.Module, merge_lora: bool, is_main: bool) -> dict[str, torch.Tensor]:
    """Full state dict on CPU on the main rank ({} elsewhere); see `merged_tensors`."""
    return {k: v.cpu().clone() for k, v, _ in merged_tensors(model, merge_lora, is_main)}


def save_hf(
    model, out_dir: str | Path, tokenizer=None, lora_save: str = "merged", is_main: bool = True
) -> Path:
    """Write `model` as a plain HF dir (or a peft adapter dir when lora_save='adapter'), atomically.

    Every rank must call this under ZeRO-3 (the gather is collective)."""
    from chatforge.models.lora import is_peft_model

    merge = not (is_peft_model(model) and lora_save == "adapter")
    state = gathered_state_dict(model, merge_lora=merge, is_main=is_main)
    return save_state_dict(model, state, out_dir, tokenizer, is_main, merged=merge)


def save_state_dict(
    model, state: dict[str, torch.Tensor], out_dir: str | Path, tokenizer=None, is_main: bool = True,
    merged: bool = True,
) -> Path:  # fmt: skip
    """Write `state` (base-model names when `merged`) with `model`'s architecture and config, atomically."""
    from chatforge.models.lora import is_peft_model

    with atomic_dir(out_dir, is_main) as tmp:
        if is_main:
            target = model.get_base_model() if (is_peft_model(model) and merged) else model
            # transformers 5 empties the dict it is given; it is not reused here.
            target.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
                keep_generation_config(tokenizer, tmp)
    barrier()
    return Path(out_dir)


def keep_generation_config(tokenizer, out: Path) -> None:
    """Copy generation_config.json from the tokenizer's source dir when the export has none (a reward model
    or critic does not save one): its eos_token_id list says where turns end (Llama 3: <|eot_id|>), which
    decides where replies are scored, so it must travel with the tokenizer."""
    source = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "generation_config.json"
    if source.is_file() and not (out / "generation_config.json").is_file():
        shutil.copyfile(source, out / "generation_config.json")
