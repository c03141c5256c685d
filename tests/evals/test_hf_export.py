"""Hugging Face export (`evals.hf.export`, `mor-bench export --hf`): every family loads with
`AutoModelForCausalLM`, gives mor-bench's logits, generates mor-bench's decode engine's
greedy tokens, scores with lm-eval's own HFLM as our adapter does; the tokenizer encodes as
mor-bench's; bad input is one line and exit code 2."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from evals.cli.main import main  # noqa: E402
from evals.data.tokenizer import ByteTokenizer  # noqa: E402
from evals.hf.export import export_hf  # noqa: E402
from mor import ModelConfig, build_model, save_checkpoint  # noqa: E402
from mor.decode import Engine, Request  # noqa: E402
from mor.errors import ConfigError, DataError  # noqa: E402

transformers = pytest.importorskip("transformers")

BYTES = {"kind": "bytes", "eos_id": 256}
VARIANTS = {
    "vanilla": dict(family="vanilla"),
    "recursive": dict(family="recursive", num_recursions=2, sharing="middle_sequence"),
    "mor-expert": dict(family="mor", num_recursions=3),  # eval_routing topk: exported causal
    "mor-expert-share": dict(family="mor", num_recursions=3, kv="share"),
    "mor-token": dict(family="mor", num_recursions=3, router="token"),
}
PROMPTS = ["12 + 39 =", "the cat sat on the", "k7=42. k3=11. k7?", "a"]
TEXTS = [("12 + 39 =", " 51"), ("12 + 39 =", " 52"), ("the cat sat on the", " mat"),
         ("k7=42. k3=11. k7?", " 42"), ("a", " b c d e f g"), ("", " hello")]


def _model(kw: dict) -> torch.nn.Module:
    """A random micro model whose weights are large enough that routing decisions and greedy
    choices differ between tokens."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("micro", init_std=0.1, **kw)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("routers.", "router.")):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def _routing(model) -> dict:
    """The forward arguments of the routing an export uses (causal for expert-choice)."""
    cfg = model.cfg
    return {"routing": "causal"} if cfg.family == "mor" and cfg.router == "expert" else {}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple]:
    """name -> (mor model, checkpoint dir, export dir, export info)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, kw in VARIANTS.items():
        model = _model(kw)
        ck = save_checkpoint(model, root / name, extra={"tokenizer": BYTES})
        info = export_hf(ck, root / f"{name}-hf")
        out[name] = (model, ck, root / f"{name}-hf", info)
    return out


def _load(path: Path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), **kw).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_equal_mor_bench(exported, name):
    model, _, out, info = exported[name]
    hf = _load(out, trust_remote_code=True)
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode("the cat sat on the mat, 12 + 39 = 51"),
                        tok.encode("k7=42. k3=11. k7? 42 and x=3. y=x+22")])
    with torch.no_grad():
        got = hf(ids).logits
        want = model(ids, **_routing(model)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if name == "vanilla":
        assert type(hf).__name__ == "LlamaForCausalLM" and not info["remote_code"]
        assert not any(p.suffix == ".py" for p in out.iterdir())
        plain = _load(out)  # no remote code needed
        assert isinstance(plain, transformers.LlamaForCausalLM)
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=0)
    else:
        assert type(hf).__name__ == "MorBenchForCausalLM" and info["remote_code"]
        cfg = json.loads((out / "config.json").read_text())
        assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        source = (out / "modeling_mor_bench.py").read_text()
        assert "from mor import" in source and "class Block" not in source
    if name == "mor-expert":
        assert info["routing"] == "causal" and info["source_eval_routing"] == "topk"
        with torch.no_grad():  # the export really routes causally, not with top-k
            assert not torch.allclose(got, model(ids, routing="topk").logits, atol=1e-4)


def test_remote_code_model_loads_in_bfloat16(exported):
    """dtype=torch.bfloat16 casts the weights; the RoPE tables (not in the checkpoint) are
    made in the same dtype, so the forward runs and stays close to fp32."""
    model, _, out, _ = exported["mor-expert-share"]
    hf = _load(out, trust_remote_code=True, dtype=torch.bfloat16)
    assert hf.mor.rope.cos.dtype == torch.bfloat16
    ids = torch.tensor([ByteTokenizer().encode("the cat sat on the mat")])
    with torch.no_grad():
        got = hf(ids).logits.float()
        want = model(ids, routing="causal").logits
    assert (got - want).abs().max() < 0.05


@pytest.mark.parametrize("name", ["recursive", "mor-expert", "mor-expert-share", "mor-token"])
def test_padded_rows_score_as_alone(exported, name):
    """attention_mask (left or right padding): a row's real tokens get the logits they get
    alone -- positions count real tokens only and padding is never attended to."""
    model, _, out, _ = exported[name]
    hf = _load(out, trust_remote_code=True)
    tok = ByteTokenizer()
    short, long = tok.encode("12 + 39 = 51"), tok.encode("the cat sat on the mat, twice")
    n, t = len(short), len(long)
    with torch.no_grad():
        alone = model(torch.tensor([short]), **_routing(model)).logits[0]
        for side in ("left", "right"):
            ids = torch.full((2, t), 256)
            mask = torch.zeros(2, t, dtype=torch.long)
            cols = slice(t - n, t) if side == "left" else slice(0, n)
            ids[0, cols], mask[0, cols] = torch.tensor(short), 1
            ids[1], mask[1] = torch.tensor(long), 1
            got = hf(ids, attention_mask=mask).logits
            torch.testing.assert_close(got[0, cols], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate_matches_the_decode_engine(exported, name):
    model, _, out, _ = exported[name]
    hf = _load(out, trust_remote_code=True)
    tok, new = ByteTokenizer(), 8
    engine = Engine(model, max_batch=4, max_len=64, kv_capacity="full", temperature=0.0)
    comps = engine.generate([Request(prompt=tok.encode(p), max_new_tokens=new, id=i)
                             for i, p in enumerate(PROMPTS)])
    outs = []
    for prompt, comp in zip(PROMPTS, comps, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          do_sample=False)[0, ids.shape[1]:].tolist()
        want = comp.tokens[: comp.tokens.index(256) + 1] if 256 in comp.tokens else comp.tokens
        assert gen[: len(want)] == want, (prompt, gen, comp.tokens)
        outs.append(gen)
    assert len({tuple(o) for o in outs}) > 1  # the prompts lead to different continuations
    if name != "vanilla":
        # a left-padded batch generates what each prompt generates alone
        enc = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
        enc.padding_side = "left"
        batch = enc(PROMPTS, return_tensors="pt", padding=True)
        got = hf.generate(**batch, max_new_tokens=new, do_sample=False)
        width = batch["input_ids"].shape[1]
        for row, alone in zip(got[:, width:].tolist(), outs, strict=True):
            assert row[: len(alone)] == alone


def test_tokenizer_encodes_as_mor_bench(exported):
    _, _, out, info = exported["vanilla"]
    assert info["tokenizer"] == "bytes" and info["eos_id"] == 256
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert isinstance(hf_tok, transformers.PreTrainedTokenizerFast)
    ours = ByteTokenizer()
    for text in ["k7=42", " the cat", "héllo wörld ✓", "a<|endoftext|>b", ""]:
        assert hf_tok(text)["input_ids"] == ours.encode(text), text
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.pad_token_id) == (256, 256, 256)
    assert hf_tok.decode([104, 195, 169, 256]) == ours.decode([104, 195, 169, 256])
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == 256
    # a remote-code export writes the same tokenizer
    mor_out = exported["mor-token"][2]
    mor_tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(mor_out))
    assert mor_tok("héllo")["input_ids"] == ours.encode("héllo")


def test_bpe_tokenizer_is_exported(tmp_path):
    from evals.data.synthetic import Document
    from evals.data.tokenizer import BPETokenizer, tokenizer_to_spec

    docs = [Document(id=str(i), text=f"the cat sat on the mat {i} times. x={i}+{i}",
                     source="t") for i in range(60)]
    bpe = BPETokenizer.train(docs, 300)
    model = build_model(ModelConfig.from_preset("micro", vocab_size=bpe.vocab_size))
    ck = save_checkpoint(model, tmp_path / "ck",
                         extra={"tokenizer": {**tokenizer_to_spec(bpe), "eos_id": bpe.eos_id}})
    info = export_hf(ck, tmp_path / "hf")
    assert info["tokenizer"] == "bpe" and info["eos_id"] == bpe.eos_id
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["the cat sat on the mat 7 times.", "héllo<|endoftext|>x=3"]:
        assert hf_tok(text)["input_ids"] == bpe.encode(text), text
    assert hf_tok.eos_token_id == hf_tok.bos_token_id == bpe.eos_id


def _hflm_pair(exported, name):
    pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from evals.lmeval.adapter import MorBenchLM

    model, ck, out, _ = exported[name]
    ref = HFLM(pretrained=str(out), trust_remote_code=True, batch_size=4, device="cpu",
               backend="causal")
    ours = MorBenchLM(str(ck), batch_size=4,
                      **({"routing": "causal"} if _routing(model) else {}))
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(TEXTS)]
    return ref.loglikelihood(reqs, disable_tqdm=True), ours.loglikelihood(reqs,
                                                                            disable_tqdm=True)


@pytest.mark.parametrize("name", ["vanilla", "mor-expert", "mor-token"])
def test_lm_eval_hflm_on_the_export_scores_as_our_adapter(exported, name):
    a, b = _hflm_pair(exported, name)
    for (x, gx), (y, gy) in zip(a, b, strict=True):
        assert x == pytest.approx(y, abs=1e-4) and gx == gy


# --- the command -------------------------------------------------------------------------------
def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["export", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mor-bench: error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_cli_writes_and_reports(exported, tmp_path, capsys):
    _, ck, _, _ = exported["mor-token"]
    rc, out, _ = _run(capsys, ck, "--hf", tmp_path / "a", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["architecture"] == "MorBenchForCausalLM" and info["routing"] == "token"
    assert {"config.json", "model.safetensors", "modeling_mor_bench.py",
            "configuration_mor_bench.py", "tokenizer.json"} <= set(info["files"])
    rc, out, _ = _run(capsys, exported["vanilla"][1], "--hf", tmp_path / "b")
    assert rc == 0 and "LlamaForCausalLM" in out and "no remote code" in out
    # an existing, non-empty OUT: refused, then overwritten with --force (other files kept)
    (tmp_path / "b" / "notes.txt").write_text("mine")
    rc, _, err = _run(capsys, ck, "--hf", tmp_path / "b")
    assert rc == 2
    _one_line_error(err, "not empty", "--force")
    rc, out, _ = _run(capsys, ck, "--hf", tmp_path / "b", "--force", "--json")
    assert rc == 0 and (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert "notes.txt" not in json.loads(out)["files"]
    assert "modeling_mor_bench.py" in json.loads(out)["files"]
    assert type(_load(tmp_path / "b", trust_remote_code=True)).__name__ == "MorBenchForCausalLM"
    with pytest.raises(SystemExit) as exc:  # --help teaches
        main(["export", "--help"])
    assert exc.value.code == 0
    assert "trust_remote_code=True" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    model = _model(VARIANTS["vanilla"])
    rc, _, err = _run(capsys, tmp_path / "nope", "--hf", tmp_path / "o1")
    assert rc == 2
    _one_line_error(err, "does not exist")
    ck = save_checkpoint(model, tmp_path / "ck", extra={"tokenizer": BYTES})
    (ck / "model.safetensors").rename(tmp_path / "w.safetensors")
    rc, _, err = _run(capsys, ck, "--hf", tmp_path / "o2")
    assert rc == 2
    _one_line_error(err, "model.safetensors is missing")
    (tmp_path / "w.safetensors").rename(ck / "model.safetensors")
    good = (ck / "config.json").read_text()
    (ck / "config.json").write_text("{not json\n")
    rc, _, err = _run(capsys, ck, "--hf", tmp_path / "o3")
    assert rc == 2
    _one_line_error(err, "cannot read", "config.json")
    (ck / "config.json").write_text(good)
    rc, _, err = _run(capsys, ck, "--hf", ck)
    assert rc == 2
    _one_line_error(err, "checkpoint itself")
    for o in ("o1", "o2", "o3"):  # nothing was written on the way
        assert not (tmp_path / o).exists()
    # tokenizers: unknown kind refused (naming it), none recorded needs --no-tokenizer
    odd = save_checkpoint(model, tmp_path / "odd", extra={"tokenizer": {"kind": "sentencepiece"}})
    rc, _, err = _run(capsys, odd, "--hf", tmp_path / "o4")
    assert rc == 2
    _one_line_error(err, "'sentencepiece'")
    bare = save_checkpoint(model, tmp_path / "bare")
    rc, _, err = _run(capsys, bare, "--hf", tmp_path / "o5")
    assert rc == 2
    _one_line_error(err, "--no-tokenizer")
    rc, out, _ = _run(capsys, bare, "--hf", tmp_path / "o5", "--no-tokenizer")
    assert rc == 0 and not (tmp_path / "o5" / "tokenizer.json").exists()


def test_library_errors_are_mor_bench_errors(tmp_path):
    with pytest.raises(ConfigError):
        export_hf(tmp_path / "missing", tmp_path / "out")
    model = _model(VARIANTS["vanilla"])
    ck = save_checkpoint(model, tmp_path / "ck", extra={"tokenizer": {"kind": "bytes",
                                                                      "eos_id": 3}})
    with pytest.raises(DataError, match="eos_id=3"):
        export_hf(ck, tmp_path / "out")
