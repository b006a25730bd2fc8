"""Does CLADO's second-order model predict the joint loss of the plans it picks? (issue 9)

    .venv/bin/python benchmarks/clado_joint.py [--model resnet20] [--calib-size 1024] [--budgets 2.5,3,3.5,4]

For each budget, the CLADO and CLADO-diag plans (W{2,4,8}, A8, searched layers only, as in the
probes) are run as one probe on the sensitivity set: their measured joint ΔL is set beside the
IQP's prediction ½xᵀGx from the raw G and from the PSD-projected G that CLADO optimises, and beside
the test top-1 that `benchmarks/clado_resnet20.py` measured (read from its results.json). The
searches read the pair probes from the default probe cache (measured once if absent).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import mpqkit
from mpqkit.api import calibration_set, load_model
from mpqkit.engine.probe import ProbeEngine
from mpqkit.graph import discover
from mpqkit.plan import atomic_write_text
from mpqkit.sensitivity.crosslayer import build_g, make_psd
from mpqkit.solve.iqp import QuadraticObjective
from mpqkit.quant.config import QuantConfig

# measured with nearest rounding, before GPTQ became the default quantizer: pinned, so a rerun reproduces it
NEAREST = QuantConfig(rounding="nearest")

BITS = (2, 4, 8)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--calib-size", "--sens-samples", dest="sens_samples", type=int, default=1024)
    ap.add_argument("--budgets", default="2.5,3,3.5,4")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or f"benchmarks/results/clado_{args.model}")
    bundle = load_model(args.model)
    graph = discover(bundle.model, bundle.input_shape)
    calib = calibration_set(args.data, args.sens_samples, 0)
    engine = ProbeEngine(bundle.model, graph, calib.images, calib.labels, progress=False, qconfig=NEAREST)  # search's cache context
    base = {f: (None, 8) for f in graph.names}
    ref = engine.run([{}], base=base, show=False)[0]
    bench = out / "results.json"
    top1 = {(r["budget"], r["method"]): r["top1_test"] for r in json.loads(bench.read_text())["rows"]} \
        if bench.exists() else {}
    rows = []
    for b in args.budgets.split(","):
        budget = f"avg-bits={b}"
        res = {m: mpqkit.search(bundle, args.data, budget, m, w_candidates=BITS, calib_size=args.sens_samples,
                                progress=False, qconfig=NEAREST, options={"pair_samples": 0})  # as measured
               for m in ("clado", "clado-diag")}
        layers = res["clado"].ledger.searched
        g, _ = build_g(res["clado"].table, layers, list(BITS))
        objectives = {mode: QuadraticObjective(make_psd(g, mode)[0], None, len(layers), len(BITS))
                      for mode in ("none", "project")}
        for method, r in res.items():
            a = np.array([BITS.index(r.plan.layers[f].w_bits) for f in layers])
            joint = engine.run([{f: (r.plan.layers[f].w_bits, 8) for f in layers}], base=base, show=False)[0]
            rows.append({"budget": budget, "plan": method, "predicted_raw_G": objectives["none"].value(a),
                         "predicted_psd_G": objectives["project"].value(a), "measured_joint_dL": joint.loss - ref.loss,
                         "sens_top1": 100 * joint.top1,
                         "top1_test": top1.get((budget, method))})
            print(json.dumps(rows[-1]), flush=True)
    f = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [f"# CLADO's second-order prediction vs the measured joint ΔL ({args.model}, W{{2,4,8}}/A8)", "",
             f"Produced by `.venv/bin/python benchmarks/clado_joint.py --model {args.model} --calib-size "
             f"{args.sens_samples}`. ΔL: mean cross-entropy increase over the {args.sens_samples}-image sensitivity "
             "set with only the searched layers' weights quantized; prediction ½xᵀGx (raw G, and the "
             "PSD-projected G the IQP minimises); top-1 from `benchmarks/clado_resnet20.py`.", "",
             "| budget | plan | predicted ΔL (raw G) | predicted ΔL (PSD G) | measured joint ΔL | top-1 on the sensitivity set % | top-1 test % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['budget']} | {r['plan']} | {f(r['predicted_raw_G'])} | {f(r['predicted_psd_G'])} | "
              f"{f(r['measured_joint_dL'])} | {f(r['sens_top1'])} | {f(r['top1_test'])} |" for r in rows]
    atomic_write_text(out / "joint.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
