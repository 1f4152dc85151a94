"""sparsebert.deploy: conversion of every pruned model family, the compressed file, kernel choice, bad input."""
import json
import os
import pathlib

import pytest
import safetensors.torch
import tinybert
import torch
import transformers

from sparsebert import deploy
from sparsebert.deploy import SparseLinear, bench, cli, files
from sparsebert.deploy.modules import semi_structured_linear
from sparsebert.deploy.sources import DEPLOYED_WEIGHTS
from sparsebert.sparsity import Pruner, export_dense, save_sparse, sparsify
from conftest import HAS_CUDA, requires_cuda

# Deployed outputs against the dense-with-zeros model: float32 sums in another order only.
TOL = dict(rtol=1e-4, atol=1e-5)


def tiny(family: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "bert":
        return tinybert.classifier(seed).eval()
    if family == "roberta":
        config = transformers.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=40, num_labels=2)
        return transformers.RobertaForSequenceClassification(config).eval()
    config = transformers.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=32, num_labels=2)
    return transformers.DistilBertForSequenceClassification(config).eval()


def pruned(family="bert", sparsity=0.9, pattern="global", **pattern_kwargs):
    model = tiny(family)
    Pruner(sparsify(model), "magnitude", pattern, None, pattern_kwargs=pattern_kwargs).prune(sparsity)
    return model


def inputs(batch=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tinybert.VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch=None):
    with torch.no_grad():
        return model(**(batch or inputs())).logits


def prunable(model):
    return {n: m for n, m in model.named_modules() if n in {l["name"] for l in model.sparsebert_deploy["layers"]}}


# ---------------------------------------------------------------------------------------
# Conversion and round trip, per model family


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_converted_model_matches_dense_and_round_trips(family, tmp_path):
    model = pruned(family)
    deployed = deploy.convert(model, kernel="sparse")
    layers = prunable(deployed)
    assert len(layers) == 12 and all(isinstance(m, SparseLinear) for m in layers.values())
    torch.testing.assert_close(logits(deployed), logits(model), **TOL)
    deploy.save_pretrained(deployed, tmp_path / "out")
    loaded = deploy.from_pretrained(tmp_path / "out")
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded), logits(deployed))
    for name, module in prunable(loaded).items():
        assert torch.equal(module.dense_weight(), layers[name].dense_weight()), name


def test_converted_model_compiles_without_graph_breaks():
    deployed = deploy.convert(pruned(), timing_tokens=())
    torch._dynamo.reset()
    compiled = torch.compile(deployed, fullgraph=True)
    torch.testing.assert_close(logits(compiled), logits(deployed), **TOL)


def test_source_is_not_modified():
    model = pruned()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy.convert(model, kernel="sparse")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["run dir", "sparse checkpoint", "exported model", "deployed model", "pipeline"])
def test_every_source_kind(kind, tmp_path):
    model = pruned()
    if kind == "sparse checkpoint":
        save_sparse(model, tmp_path / "src")
    elif kind == "exported model":
        export_dense(model, tmp_path / "src")
    elif kind == "run dir":
        export_dense(model, tmp_path / "src" / "model")
        (tmp_path / "src" / "done.json").write_text(json.dumps({"stage": "downstream"}))
    elif kind == "pipeline":
        export_dense(tiny("bert"), tmp_path / "src" / "teacher-sst2" / "model")
        (tmp_path / "src" / "teacher-sst2" / "done.json").write_text(json.dumps({"stage": "teacher"}))
        export_dense(model, tmp_path / "src" / "downstream-sst2" / "model")
        (tmp_path / "src" / "downstream-sst2" / "done.json").write_text(json.dumps({"stage": "downstream"}))
    else:
        deploy.save_pretrained(deploy.convert(model, timing_tokens=()), tmp_path / "src")
    expected = {"pipeline": "exported model", "run dir": "exported model"}.get(kind, kind)
    assert deploy.resolve(tmp_path / "src")[0] == expected
    deployed = deploy.convert(tmp_path / "src", timing_tokens=())
    assert deployed.sparsebert_deploy["source"] == expected
    torch.testing.assert_close(logits(deployed), logits(model), **TOL)


def test_pipeline_with_two_downstream_models_is_ambiguous(tmp_path):
    for task in ("sst2", "rte"):
        export_dense(pruned(), tmp_path / f"downstream-{task}" / "model")
    with pytest.raises(ValueError, match="holds several models.*downstream-rte, downstream-sst2"):
        deploy.convert(tmp_path)


def test_tokenizer_files_travel_with_the_model(tmp_path):
    export_dense(pruned(), tmp_path / "src")
    (tmp_path / "src" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    deploy.save_pretrained(deploy.convert(tmp_path / "src", timing_tokens=()), tmp_path / "out")
    assert (tmp_path / "out" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"


def test_bfloat16_model():
    model = pruned().to(torch.bfloat16)
    deployed = deploy.convert(model, kernel="sparse")
    assert all(m.values.dtype == torch.bfloat16 for m in prunable(deployed).values())
    torch.testing.assert_close(logits(deployed).float(), logits(model).float(), rtol=3e-2, atol=3e-2)


def test_autocast_runs_the_packed_weight_in_its_own_dtype():
    model = pruned()
    deployed = deploy.convert(model, kernel="sparse")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref = logits(deployed), logits(model)
    torch.testing.assert_close(got.float(), ref.float(), rtol=3e-2, atol=3e-2)
    with pytest.raises(RuntimeError, match="values have dtype Float but x has dtype Half"):
        deployed.bert.encoder.layer[0].attention.self.query(torch.zeros(2, 32, dtype=torch.float16))


# ---------------------------------------------------------------------------------------
# The compressed file


def stored_matrix_bytes(path: pathlib.Path) -> int:
    tensors = safetensors.torch.load_file(path / DEPLOYED_WEIGHTS)
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.endswith((".mask", ".values")))


@pytest.mark.parametrize("sparsity,bound", [(0.9, 0.15), (0.95, 0.085), (0.8, 0.235)])
def test_compressed_size(sparsity, bound, tmp_path):
    model = pruned(sparsity=sparsity)
    deployed = deploy.convert(model, timing_tokens=())
    deploy.save_pretrained(deployed, tmp_path)
    dense = sum(4 * m.weight.numel() for n, m in model.named_modules() if n in prunable(deployed))
    assert stored_matrix_bytes(tmp_path) <= bound * dense
    assert bench.size_summary(deployed)["compressed_bytes"] == stored_matrix_bytes(tmp_path)


def test_metadata_holds_version_hash_and_choices(tmp_path):
    deployed = deploy.convert(pruned(), kernel="sparse")
    deploy.save_pretrained(deployed, tmp_path)
    meta = deploy.read_metadata(tmp_path)
    assert meta["format"] == "sparsebert-deploy" and meta["format_version"] == "1"
    assert meta["architecture"] == "BertForSequenceClassification" and meta["dtype"] == "float32"
    assert len(meta["sha256"]) == 64
    assert [l["kernel"] for l in json.loads(meta["layers"])] == ["sparse"] * 12


def test_tied_weights_are_stored_once(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(tinybert.config()).eval()
    Pruner(sparsify(model), "magnitude", "global", None).prune(0.8)
    deployed = deploy.convert(model, timing_tokens=())
    deploy.save_pretrained(deployed, tmp_path)
    aliases = json.loads(deploy.read_metadata(tmp_path)["aliases"])
    assert aliases == {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                       "cls.predictions.decoder.bias": "cls.predictions.bias"}
    loaded = deploy.from_pretrained(tmp_path)
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(logits(loaded), logits(model), **TOL)


def test_encoder_without_pooler_round_trips(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(tinybert.config(), add_pooling_layer=False).eval()
    Pruner(sparsify(model), "magnitude", "global", None).prune(0.9)
    deploy.save_pretrained(deploy.convert(model, timing_tokens=()), tmp_path)
    loaded = deploy.from_pretrained(tmp_path)
    assert loaded.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs()).last_hidden_state, model(**inputs()).last_hidden_state, **TOL)


def test_load_can_choose_kernels_again(tmp_path):
    deploy.save_pretrained(deploy.convert(pruned(), timing_tokens=()), tmp_path)
    dense = deploy.from_pretrained(tmp_path, kernel="dense")
    assert all(type(m) is torch.nn.Linear for m in prunable(dense).values())
    torch.testing.assert_close(logits(dense), logits(deploy.from_pretrained(tmp_path)), **TOL)


# ---------------------------------------------------------------------------------------
# Kernel choice


def test_block_pruned_model_gets_four_row_blocks():
    model = pruned(pattern="block", block=(4, 1))
    deployed = deploy.convert(model, kernel="sparse")
    assert {m.values.shape[1] for m in prunable(deployed).values()} == {4}
    torch.testing.assert_close(logits(deployed), logits(model), **TOL)


def test_low_sparsity_layers_stay_dense_and_the_gray_zone_is_timed():
    model = pruned(sparsity=0.3, pattern="tensor")
    untimed = deploy.convert(model, timing_tokens=())
    assert all(type(m) is torch.nn.Linear for m in prunable(untimed).values())
    assert all("< 0.4" in l["reason"] for l in untimed.sparsebert_deploy["layers"])
    model = pruned(sparsity=0.5, pattern="tensor")
    timed = deploy.convert(model, timing_tokens=(16, 32))
    for layer in timed.sparsebert_deploy["layers"]:
        assert [t["tokens"] for t in layer["timings"]] == [16, 32] and layer["reason"].startswith("timed")
        faster = all(t["sparse_ms"] < t["dense_ms"] for t in layer["timings"])
        assert layer["kernel"] == ("sparse" if faster else "dense")
    torch.testing.assert_close(logits(timed), logits(model), **TOL)
    assert {l["kernel"] for l in deploy.convert(model, timing_tokens=()).sparsebert_deploy["layers"]} == {"dense"}


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="the rule for the AVX-512 kernel")
def test_high_sparsity_takes_the_sparse_kernel_without_timing():
    deployed = deploy.convert(pruned(sparsity=0.9, pattern="tensor"), timing_tokens=(16,))
    assert all(l["kernel"] == "sparse" and not l["timings"] for l in deployed.sparsebert_deploy["layers"])


def test_requested_kernels():
    model = pruned()
    dense = deploy.convert(model, kernel="dense")
    assert all(type(m) is torch.nn.Linear for m in prunable(dense).values())
    torch.testing.assert_close(logits(dense), logits(model), **TOL)
    with pytest.raises(ValueError, match="kernel must be one of"):
        deploy.convert(model, kernel="fast")


# ---------------------------------------------------------------------------------------
# 2:4 semi-structured


@pytest.mark.skipif(HAS_CUDA, reason="the CPU error")
def test_semi_structured_needs_a_cuda_gpu():
    model = pruned(pattern="nm", sparsity=0.5)
    with pytest.raises(ValueError, match="2:4 semi-structured kernel needs a CUDA GPU"):
        deploy.convert(model, kernel="2:4")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        semi_structured_linear(torch.zeros(8, 8), None)


@requires_cuda
def test_semi_structured_on_gpu():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability 8.0+")
    model = pruned(pattern="nm", sparsity=0.5).half().cuda()
    deployed = deploy.convert(model, kernel="2:4")
    batch = {k: v.cuda() for k, v in inputs(batch=32, length=32).items()}
    torch.testing.assert_close(logits(deployed, batch).float(), logits(model, batch).float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="not 2:4-pruned"):
        deploy.convert(pruned().half().cuda(), kernel="2:4")


# ---------------------------------------------------------------------------------------
# Bad input: a clear error, nothing written


def test_model_without_sparsity(tmp_path):
    with pytest.raises(ValueError, match="no sparsity"):
        deploy.convert(tiny("bert"))
    export_dense(tiny("bert"), tmp_path / "dense")
    assert cli.main(["convert", str(tmp_path / "dense"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_mask_weight_mismatch():
    model = pruned()
    layer = model.bert.encoder.layer[0].attention.self.query
    layer.mask = layer.mask[:, :2].contiguous()
    with pytest.raises(ValueError, match="mask/weight mismatch"):
        deploy.convert(model)


@pytest.mark.parametrize("dtype,device,match", [(torch.float64, "cpu", "unsupported dtype torch.float64"),
                                                (torch.float32, "meta", "unsupported device meta")])
def test_unsupported_dtype_or_device(dtype, device, match):
    with pytest.raises(ValueError, match=match):
        deploy.convert(pruned().to(device=device, dtype=dtype))


@pytest.fixture
def saved(tmp_path):
    deploy.save_pretrained(deploy.convert(pruned(), timing_tokens=()), tmp_path / "m")
    return tmp_path / "m"


def rewrite(path, tensors=None, **metadata):
    """Re-save the deployed file with changed tensors or metadata (the hash recomputed unless given)."""
    file = path / DEPLOYED_WEIGHTS
    meta = files.read_metadata(path)
    tensors = tensors or safetensors.torch.load_file(file)
    meta["sha256"] = files.content_hash(tensors)
    meta.update(metadata)
    safetensors.torch.save_file(tensors, file, metadata=meta)


def test_corrupted_data(saved):
    file = saved / DEPLOYED_WEIGHTS
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x40
    file.write_bytes(bytes(data))
    with pytest.raises(deploy.DeployFormatError, match="corrupted: the sha256 of its tensors does not match"):
        deploy.from_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_corrupted_structure(saved, damage):
    file = saved / DEPLOYED_WEIGHTS
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"{garbage" + data[16:])
    with pytest.raises(deploy.DeployFormatError, match="is corrupted"):
        deploy.from_pretrained(saved)


def test_newer_format_version(saved):
    rewrite(saved, format_version="2", sparsebert_version="9.0")
    with pytest.raises(deploy.DeployFormatError, match=r"newer sparsebert \(format version 2, by sparsebert 9.0\)"):
        deploy.from_pretrained(saved)


def test_stored_mask_values_mismatch(saved):
    tensors = safetensors.torch.load_file(saved / DEPLOYED_WEIGHTS)
    name = "bert.encoder.layer.1.output.dense.values"
    tensors[name] = tensors[name][:-1].clone()
    rewrite(saved, tensors)
    with pytest.raises(deploy.DeployFormatError, match="mask/values mismatch"):
        deploy.from_pretrained(saved)


def test_not_a_deployed_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a deployed sparsebert model"):
        deploy.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is not a model"):
        deploy.convert(tmp_path)


def test_save_refuses_existing_directories(saved, tmp_path):
    deployed = deploy.convert(pruned(), timing_tokens=())
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        deploy.save_pretrained(deployed, saved)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a deployed sparsebert model"):
        deploy.save_pretrained(deployed, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    deploy.save_pretrained(deployed, saved, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "other"]


def test_failed_save_writes_nothing(tmp_path, monkeypatch):
    deployed = deploy.convert(pruned(), timing_tokens=())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        deploy.save_pretrained(deployed, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Command line


def test_cli_convert_and_bench_into_a_run_report(tmp_path, capsys):
    run = tmp_path / "run"
    export_dense(pruned(), run / "model")
    (run / "done.json").write_text(json.dumps({"stage": "downstream"}))
    (run / "report.md").write_text("# a run\n\nresults\n")
    assert cli.main(["convert", str(run), str(tmp_path / "out"), "--kernel", "sparse"]) == 0
    out = capsys.readouterr().out
    assert "bert.encoder.layer.0.attention.self.query" in out and "% of dense float32" in out
    args = ["bench", str(run), "--tokens", "16,32", "--seq-len", "16", "--threads", "1", "--rounds", "2",
            "--kernel", "sparse"]
    for _ in range(2):  # the second run replaces the section
        assert cli.main(args) == 0
    report = (run / "report.md").read_text()
    assert report.startswith("# a run\n\nresults\n") and report.count("## Inference: sparse vs dense") == 1
    result = json.loads((run / "inference.json").read_text())
    assert [(r["threads"], r["tokens"], r["batch"]) for r in result["rows"]] == [(1, 16, "1x16"), (1, 32, "2x16")]
    assert result["layers"] == {"sparse": 12} and result["max_relative_difference"] <= 1e-4
    assert all(r["dense_ms"] > 0 and r["sparse_ms"] > 0 for r in result["rows"])
    assert cli.main(["bench", str(tmp_path / "out"), "--tokens", "16", "--rounds", "1"]) == 0
    assert not (tmp_path / "out" / "report.md").exists()


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["bench", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", str(tmp_path), "--tokens", "12,x"])
    export_dense(pruned(), tmp_path / "m")
    assert cli.main(["bench", str(tmp_path / "m"), "--tokens", "24", "--seq-len", "16"]) == 2
    assert "multiple of the sequence length" in capsys.readouterr().err
