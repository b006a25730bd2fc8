#!/usr/bin/env bash
# Every row of docs/RESULTS.md, then the page itself. Resumable: each `mpqkit bench` skips the rows
# already in its rows.jsonl and the probe cache keeps measured sensitivities, so rerun after a stop.
# Hours on a 2-core CPU (ResNet-56: about 2.5 h with one core). Run from the repository root.
set -euo pipefail
M="${MPQKIT:-.venv/bin/mpqkit}"
R=benchmarks/results
BASE=uniform,eval-delta,hawq,mpqco,mixquant,mixquant-ilp,greedy,infoq
AVG=avg-bits=2.5:4:0.5

$M bench -q --model resnet20 --methods "$BASE" --budgets "$AVG" --ptq default --out $R/bench_resnet20
$M bench -q --model resnet20 --methods "$BASE" --budgets avg-bits=3 --ptq brecq --out $R/bench_resnet20
$M proxies -q --model resnet20 --out $R/bench_resnet20
$M bench -q --model resnet20 --methods clado,clado-diag,eval-delta,uniform --w-candidates 2,4,8 \
    --budgets "$AVG" --ptq default --out $R/bench_resnet20_clado
$M bench -q --model resnet56 --methods "$BASE" --budgets "$AVG" --ptq default --out $R/bench_resnet56
# CLADO on ResNet-56 with 256 sensitivity images: 13k probes, ~40 min on one core (the probes are
# shared with benchmarks/clado_resnet20.py --model resnet56 --cache-dir ~/.cache/mpqkit)
$M bench -q --model resnet56 --methods clado,clado-diag,eval-delta,uniform --w-candidates 2,4,8 --calib-size 256 \
    --budgets "$AVG" --ptq default --out $R/bench_resnet56_clado
# K = 5 calibration draws (seeds 0-4) at avg-bits 3: paired comparisons with 95 % intervals and plan stability,
# auto (which also runs hawq, greedy and infoq on each draw, first, so its search time is a cold one) and
# the cheap methods; then --refine 60 on two of them
$M bench -q --model resnet20 --methods auto,uniform,eval-delta,mpqco,mixquant-ilp,infoq,greedy,hawq --budgets avg-bits=3 --ptq default \
    --splits test --draws 5 --out $R/draws_resnet20
$M bench -q --model resnet20 --methods eval-delta,mixquant-ilp --budgets "avg-bits=2.5;avg-bits=3" --ptq default \
    --splits test --draws 5 --refine 60 --out $R/draws_resnet20_refine
$M bench -q --model resnet20 --methods eval-delta,mixquant-ilp --budgets avg-bits=2.5 --ptq default --splits test \
    --draws 5 --out $R/draws_resnet20
.venv/bin/python benchmarks/refine_gain.py
$M report $R/bench_resnet20 $R/bench_resnet20_clado $R/bench_resnet56 $R/bench_resnet56_clado \
    $R/draws_resnet20 $R/draws_resnet20_refine --markdown docs/RESULTS.md
