#!/usr/bin/env bash
# Every row of docs/RESULTS.md, then the page itself. Resumable: each `mpqkit bench` skips the rows
# already in its rows.jsonl and the probe cache keeps measured sensitivities, so rerun after a stop.
# Hours on a 2-core CPU. Run from the repository root.
set -euo pipefail
M="${MPQKIT:-.venv/bin/mpqkit}"
R=benchmarks/results
BASE=uniform,eval-delta,hawq,mpqco,mixquant,mixquant-ilp,greedy,infoq
AVG=avg-bits=2.5:4:0.5
# the directories below were measured with nearest rounding (the quantizer before GPTQ became the default): pinned,
# so a rerun reproduces them
RTN="--rounding nearest"
# the four legacy directories below (single draw) also predate the KL probe objective and the prob form of mpqco:
# both pinned; their calibration pool (30,000 images then, all 50,000 now) cannot be, so their rows stay as
# measured (see each note.md)
LEGACY="$RTN --objective ce"

$M bench -q $LEGACY --model resnet20 --methods "$BASE" --mpqco-output logit --budgets "$AVG" --ptq default \
    --out $R/bench_resnet20
$M bench -q $LEGACY --model resnet20 --methods "$BASE" --mpqco-output logit --budgets avg-bits=3 --ptq brecq \
    --out $R/bench_resnet20
$M proxies -q $RTN --model resnet20 --out $R/bench_resnet20
$M bench -q $LEGACY --model resnet20 --methods clado,clado-diag,eval-delta,uniform --w-candidates 2,4,8 \
    --pair-samples 0 --budgets "$AVG" --ptq default --out $R/bench_resnet20_clado
# legacy: the original akamaster ResNet-56 (trained on the original pixels; `resnet56` is the JPEG fine-tune now)
$M bench -q $LEGACY --model resnet56-orig --methods "$BASE" --mpqco-output logit --budgets "$AVG" --ptq default \
    --out $R/bench_resnet56
$M bench -q $LEGACY --model resnet56-orig --methods uniform --budgets "avg-bits=2.5;avg-bits=3" --ptq brecq \
    --out $R/bench_resnet56
# CLADO on ResNet-56 with 256 sensitivity images: 13k probes, ~40 min on one core (the probes are
# shared with benchmarks/clado_resnet20.py --model resnet56-orig --cache-dir ~/.cache/mpqkit)
$M bench -q $LEGACY --model resnet56-orig --methods clado,clado-diag,eval-delta,uniform --w-candidates 2,4,8 --calib-size 256 \
    --pair-samples 0 --budgets "$AVG" --ptq default --out $R/bench_resnet56_clado
# CLADO's IQP on that measured G (issue 16, part 2): gap without and with the convex bound, 60 s each, no probes
PYTHONPATH=src .venv/bin/python benchmarks/iqp_resnet56.py
# The probe objective (issue 15, part 2): eval-delta and greedy with label cross-entropy and with KL to
# the fp outputs (the default), on the same 5 draws; paired_objective.md gives the spread before and after
for o in ce kl; do
    $M bench -q $RTN --model resnet20 --methods eval-delta,greedy --budgets "$AVG" --ptq default --splits test \
        --draws 5 --objective $o --out $R/objective_resnet20_$o
done
.venv/bin/python benchmarks/paired_dirs.py --base $R/objective_resnet20_ce --other $R/objective_resnet20_kl \
    --name objective --base-label ce --other-label kl --title "Probe objective: KL to the fp outputs vs cross-entropy"
# K = 5 calibration draws (seeds 0-4): paired comparisons with 95 % intervals and plan stability. auto runs
# first on each draw at avg-bits 3, so its search time there is a cold one.
$M bench -q $RTN --model resnet20 --methods auto,uniform,eval-delta,mpqco,mixquant,mixquant-ilp,infoq,greedy,hawq \
    --budgets avg-bits=3 --ptq default --splits test --draws 5 --out $R/draws_resnet20
# mpqco's logit form (the default before 04fe2d3) on the same draws; the auto rows in that directory were made
# by 927a871, whose auto tried the logit form (see its note.md)
$M bench -q $RTN --model resnet20 --methods mpqco --mpqco-output logit --budgets avg-bits=3 --ptq default --splits test \
    --draws 5 --out $R/draws_resnet20_mpqco_logit
$M bench -q $RTN --model resnet20 --methods mpqco --mpqco-output logit --budgets "avg-bits=2.5;avg-bits=3.5;avg-bits=4" \
    --ptq default --splits test --draws 3 --out $R/draws_resnet20_mpqco_logit
$M bench -q $RTN --model resnet20 --methods uniform,eval-delta,mpqco,mixquant,mixquant-ilp,greedy \
    --budgets "$AVG" --ptq default --splits test --draws 5 --out $R/draws_resnet20
# infoq and hawq (~5 min of 2 cores per draw) at the other budgets
$M bench -q $RTN --model resnet20 --methods infoq,hawq --budgets "$AVG" --ptq default --splits test --draws 5 \
    --out $R/draws_resnet20
$M bench -q $RTN --model resnet20 --methods auto --budgets "avg-bits=2.5;avg-bits=3.5;avg-bits=4" --ptq default \
    --splits test --draws 5 --out $R/draws_resnet20
$M bench -q $RTN --model resnet20 --methods auto,uniform --budgets avg-bits=3 --ptq brecq --splits test \
    --draws 5 --out $R/draws_resnet20
# the same with 2,000 reconstruction iterations per block (4x the CPU default; ~4x the time)
$M bench -q $RTN --model resnet20 --methods auto,uniform --budgets avg-bits=3 --ptq brecq --recon-iters 2000 --splits test \
    --draws 5 --out $R/draws_resnet20_brecq2000
# and 5,000 (~18 min of one core per plan), seeds 1-4 (seed 0 has no row: see the note.md)
$M bench -q $RTN --model resnet20 --methods auto --budgets avg-bits=3 --ptq brecq --recon-iters 5000 --splits test \
    --seed 1 --draws 4 --out $R/draws_resnet20_brecq5000
# auto's held-out choice at 3.5 (it picks mixquant-ilp, eval-delta scores higher on test): other rules on the same plans
.venv/bin/python benchmarks/auto_selection.py --budgets avg-bits=3.5 --heldout 4096 \
    --out $R/draws_resnet20/paired_auto_selection.md
# --refine 60 on three methods, paired with their own plans above
$M bench -q $RTN --model resnet20 --methods eval-delta,mixquant-ilp,mpqco --budgets "avg-bits=2.5;avg-bits=3" --ptq default \
    --splits test --draws 5 --refine 60 --out $R/draws_resnet20_refine
$M bench -q $RTN --model resnet20 --methods mpqco --mpqco-output logit --budgets "avg-bits=2.5;avg-bits=3" --ptq default \
    --splits test --draws 5 --refine 60 --out $R/draws_resnet20_refine_mpqco_logit
.venv/bin/python benchmarks/paired_dirs.py --base $R/draws_resnet20 --other $R/draws_resnet20_refine --name refine \
    --base-label plain --other-label refined --title "--refine 60 vs the method's own plan"
# issue 16: CLADO at the default six bit-widths (pairs chosen by --pair-tol 0.05) and CLADO-diag over 5 draws, and
# the exact all-pairs mode (--pair-tol 0) on the same draws (pairs on every calibration sample, as measured
# before --pair-samples); MixQuant's threshold rules over 3 draws
$M bench -q $RTN --model resnet20 --methods clado,clado-diag,uniform --budgets "$AVG" --ptq default --splits test \
    --draws 5 --pair-samples 0 --out $R/draws_resnet20_clado
$M bench -q $RTN --model resnet20 --methods clado --pair-tol 0 --budgets "$AVG" --ptq default --splits test --draws 2 \
    --pair-samples 0 --out $R/draws_resnet20_clado_allpairs
.venv/bin/python benchmarks/paired_dirs.py --base $R/draws_resnet20_clado_allpairs --other $R/draws_resnet20_clado \
    --name allpairs --base-label "all pairs" --other-label "pair-tol 0.05" \
    --title "CLADO: pairs chosen by --pair-tol 0.05 (default) vs all pairs"
# MixQuant: the default rule (absolute) is measured in draws_resnet20 above; the other two rules here (the
# relative rows were measured in draws_resnet20 while relative was the default, then moved; see its note.md)
$M bench -q $RTN --model resnet20 --methods mixquant --mixquant-rule relative --budgets avg-bits=3 --ptq default \
    --splits test --draws 5 --out $R/draws_resnet20_mixquant_relative
$M bench -q $RTN --model resnet20 --methods mixquant --mixquant-rule relative --budgets "avg-bits=2.5;avg-bits=3.5;avg-bits=4" \
    --ptq default --splits test --draws 3 --out $R/draws_resnet20_mixquant_relative
$M bench -q $RTN --model resnet20 --methods mixquant --mixquant-rule weighted --budgets "$AVG" --ptq default \
    --splits test --draws 3 --out $R/draws_resnet20_mixquant_weighted
# MixQuant + BRECQ vs uniform + BRECQ at equal size (avg-bits 3: uniform+BRECQ has 5 draws above)
$M bench -q $RTN --model resnet20 --methods mixquant,uniform --budgets "avg-bits=3;avg-bits=4" --ptq brecq --splits test \
    --draws 3 --out $R/draws_resnet20
# SMPQ and DMPQ (quick preset; one supernet per budget and draw, ~10-15 min of 2 cores each): the papers'
# argmax pick, and --select ilp (the most probable plan spending >= 98 % of the budget: equal size)
$M bench -q $RTN --model resnet20 --methods smpq,dmpq,uniform --budgets "avg-bits=3;avg-bits=4" --ptq default \
    --splits test --draws 5 --out $R/draws_resnet20_smpq
$M bench -q $RTN --model resnet20 --methods smpq,dmpq --select ilp --budgets "avg-bits=3;avg-bits=4" --ptq default \
    --splits test --draws 1 --out $R/draws_resnet20_smpq_fill
# the exact per-layer Shapley game (no sampling noise), on the supernet's weights and on the pretrained ones,
# plan by the Shapley values (avg-bits 3, draw 0; the avg-bits 4 runs were stopped for CPU time: see note.md)
$M bench -q $RTN --model resnet20 --methods smpq --shapley-game layer --smpq-score shapley --budgets avg-bits=3 \
    --ptq default --splits test --draws 1 --out $R/draws_resnet20_smpq_layer
$M bench -q $RTN --model resnet20 --methods smpq --shapley-game layer --shapley-weights pretrained --smpq-score shapley \
    --budgets avg-bits=3 --ptq default --splits test --draws 1 --out $R/draws_resnet20_smpq_layer_pretrained
# the seed methods' claims, each as a paired difference over the draws above
.venv/bin/python benchmarks/claims.py --out $R/draws_resnet20/paired_claims.md \
    --claim "CLADO > CLADO-diag;$R/draws_resnet20_clado;clado;$R/draws_resnet20_clado;clado-diag" \
    --claim "CLADO > uniform;$R/draws_resnet20_clado;clado;$R/draws_resnet20_clado;uniform" \
    --claim "InfoQ ≥ HAWQ;$R/draws_resnet20;infoq;$R/draws_resnet20;hawq" \
    --claim "MixQuant > uniform;$R/draws_resnet20;mixquant;$R/draws_resnet20;uniform" \
    --claim "MixQuant+BRECQ > uniform+BRECQ;$R/draws_resnet20;mixquant@brecq;$R/draws_resnet20;uniform@brecq" \
    --claim "auto+BRECQ > uniform+BRECQ;$R/draws_resnet20;auto@brecq;$R/draws_resnet20;uniform@brecq" \
    --claim "auto+BRECQ > uniform+BRECQ (2,000 iterations);$R/draws_resnet20_brecq2000;auto@brecq;$R/draws_resnet20_brecq2000;uniform@brecq" \
    --claim "auto+BRECQ, 2,000 iterations > 500;$R/draws_resnet20_brecq2000;auto@brecq;$R/draws_resnet20;auto@brecq;avg-bits=3" \
    --claim "auto+BRECQ, 5,000 iterations > 2,000;$R/draws_resnet20_brecq5000;auto@brecq;$R/draws_resnet20_brecq2000;auto@brecq" \
    --claim "SMPQ > DMPQ;$R/draws_resnet20_smpq;smpq;$R/draws_resnet20_smpq;dmpq" \
    --claim "SMPQ > uniform;$R/draws_resnet20_smpq;smpq;$R/draws_resnet20_smpq;uniform" \
    --claim "SMPQ > DMPQ (equal size);$R/draws_resnet20_smpq_fill;smpq;$R/draws_resnet20_smpq_fill;dmpq" \
    --claim "SMPQ (equal size) > uniform;$R/draws_resnet20_smpq_fill;smpq;$R/draws_resnet20_smpq;uniform" \
    --claim "SMPQ (exact layer game, by Shapley) > DMPQ;$R/draws_resnet20_smpq_layer;smpq;$R/draws_resnet20_smpq;dmpq" \
    --claim "SMPQ (layer game on pretrained weights) > DMPQ;$R/draws_resnet20_smpq_layer_pretrained;smpq;$R/draws_resnet20_smpq;dmpq"
# Issue 17: models beyond CIFAR ResNets. The fine-tuned ResNets are made first:
for d in 32 44; do test -f ../shared/models/cifar10_resnet${d}_jpegft/resnet${d}_jpegft.th || \
    PYTHONPATH=src .venv/bin/python scripts/finetune_cifar_resnet.py --depth $d --epochs 2; done
test -f ../shared/models/cifar10_resnet56_jpegft/resnet56_jpegft.th || \
    PYTHONPATH=src .venv/bin/python scripts/finetune_cifar_resnet.py --depth 56 --epochs 3
# the zoo's fp32 accuracies that no bench directory records (docs/USAGE.md's model table)
mkdir -p $R/zoo_fp32
for m in resnet32 resnet44 resnet20-orig resnet32-orig resnet44-orig; do
    $M eval -q --model $m --data cifar10 --split test --json > $R/zoo_fp32/$m-test.json
done
for m in resnet32 resnet44; do $M eval -q --model $m --data cifar10 --split exact --json > $R/zoo_fp32/$m-exact.json; done
$M bench -q $RTN --model resnet56 --methods uniform,eval-delta,mpqco,clado-diag,auto --budgets avg-bits=3:4:1 \
    --ptq default --out $R/bench_resnet56_ft
# MobileNetV2 (depthwise: uniform 3-5 bits collapse) on the ImageNet subset, 128 calibration images, 2 draws
# (auto: 128 images are one chunk, so its refinement is skipped with a warning)
# hawq with 32 of the 128 images: not run to the end (12 Hutchinson iterations of up to 200 took 70 min of a loaded
# 2-core machine; see the note.md): a GPU job
# (`--methods hawq --hawq-samples 32` with these settings left no row); infoq ran on draw 0 only
$M bench -q $RTN --model mobilenetv2 --methods uniform,eval-delta,clado-diag,mpqco,auto \
    --budgets avg-bits=3:5:1 --ptq default --splits test --calib-size 128 --draws 2 --out $R/bench_mobilenetv2
$M bench -q $RTN --model mobilenetv2 --methods infoq \
    --budgets avg-bits=3:5:1 --ptq default --splits test --calib-size 128 --draws 1 --out $R/bench_mobilenetv2
# BRECQ on MobileNetV2 (avg-bits 4, draw 0, 128 images), 100 iterations per block: not run to the end. The default
# 500 did not reconstruct one plan in 40 min on a loaded 2-core machine; with 100, blocks 0-1 took 7 min and block 2 ran
# at 11 s per iteration (19 min for 100) on a 2-core machine shared by four jobs: hours per plan there
$M bench -q $RTN --model mobilenetv2 --methods eval-delta,uniform --budgets avg-bits=4 --ptq brecq --recon-iters 100 \
    --splits test --calib-size 128 --draws 1 --out $R/bench_mobilenetv2_brecq
# mpqco's logit form on the same draws (collapses on draw 1: one near-zero true-class logit rules its table)
$M bench -q $RTN --model mobilenetv2 --methods mpqco --mpqco-output logit --budgets avg-bits=3:5:1 \
    --ptq default --splits test --calib-size 128 --draws 2 --out $R/bench_mobilenetv2_mpqco_logit
# ConvMixer: two draws of seven methods, BRECQ on draw 0
$M bench -q $RTN --model convmixer --methods uniform,eval-delta,clado-diag,mpqco,hawq,infoq,auto --budgets avg-bits=3:5:1 \
    --ptq default --draws 2 --out $R/bench_convmixer
$M bench -q $RTN --model convmixer --methods uniform,eval-delta,auto --budgets avg-bits=3 --ptq brecq --draws 1 \
    --out $R/bench_convmixer
# MiniLM-L6 on SST-2 (needs `make text`) and EfficientNet-Lite0 (the [zoo] extra)
$M bench -q $RTN --model minilm-sst2 --methods uniform,eval-delta,mpqco,clado-diag,auto --budgets avg-bits=4:6:2 \
    --ptq default --splits test --calib-size 128 --draws 2 --out $R/bench_minilm_sst2
$M bench -q $RTN --model efficientnet-lite0 --methods uniform,eval-delta,mpqco,auto --budgets avg-bits=4:6:2 \
    --ptq default --splits test --calib-size 128 --draws 2 --out $R/bench_efficientnet_lite0
.venv/bin/python benchmarks/claims.py --out $R/bench_mobilenetv2/paired_claims.md --title "MobileNetV2: mixed plans vs uniform, paired over calibration draws" \
    --claim "eval-delta > uniform;$R/bench_mobilenetv2;eval-delta;$R/bench_mobilenetv2;uniform" \
    --claim "clado-diag > uniform;$R/bench_mobilenetv2;clado-diag;$R/bench_mobilenetv2;uniform" \
    --claim "mpqco > uniform;$R/bench_mobilenetv2;mpqco;$R/bench_mobilenetv2;uniform" \
    --claim "eval-delta > clado-diag;$R/bench_mobilenetv2;eval-delta;$R/bench_mobilenetv2;clado-diag" \
    --claim "auto > uniform;$R/bench_mobilenetv2;auto;$R/bench_mobilenetv2;uniform" \
    --claim "mpqco (prob) > mpqco (logit);$R/bench_mobilenetv2;mpqco;$R/bench_mobilenetv2_mpqco_logit;mpqco"
# ONNX export checked in onnxruntime: a MobileNetV2 plan (first 100 test images) and a MiniLM plan
$M export --model mobilenetv2 --plan $R/bench_mobilenetv2/plans/eval-delta/avg-bits=4/plan.json --out \
    /tmp/mobilenetv2.onnx --check --limit 100 --json > $R/bench_mobilenetv2/onnx_check.json
$M export --model minilm-sst2 --plan $R/bench_minilm_sst2/plans/eval-delta/avg-bits=4/plan.json --out \
    /tmp/minilm.onnx --check --json > $R/bench_minilm_sst2/onnx_check.json
# Issue 27: GPTQ (the default quantizer since 300b78c), bias correction, equalization; plans chosen under the quantizer
# that ships. ResNet-20, the default path (auto + the default PTQ), 5 draws; then the PTQ steps on the same plans
# (avg-bits 3, draws 0-2: bias correction and equalization take minutes per plan on 2 cores)
$M bench -q --model resnet20 --methods auto,uniform,eval-delta --budgets "avg-bits=2.5;avg-bits=3;avg-bits=4" \
    --ptq default --splits test --draws 5 --out $R/draws_resnet20_gptq
$M bench -q --model resnet20 --methods auto --budgets "avg-bits=3" \
    --ptq nearest,gptq+bc,gptq-seq,cle+gptq --splits test --draws 3 --out $R/draws_resnet20_gptq
$M bench -q --model resnet20 --methods uniform --budgets "avg-bits=3" \
    --ptq nearest --splits test --draws 3 --out $R/draws_resnet20_gptq
# the same auto plans at avg-bits 2.5 / 4 under nearest rounding, GPTQ+BC and BRECQ-500 (a resumed bench
# quantizes the plans its earlier rows measured: no new search)
$M bench -q --model resnet20 --methods auto --budgets "avg-bits=2.5;avg-bits=4" \
    --ptq nearest,gptq+bc,brecq --splits test --draws 5 --out $R/draws_resnet20_gptq
# issue 28: eval-delta's pruned measurement replayed on full tables (probes needed, same plan?); tables measured
# with pruning are skipped: their rows above are the same plans, so rerun that bench with --no-prune for full ones
PYTHONPATH=src .venv/bin/python benchmarks/prune_replay.py --dir $R/draws_resnet20_gptq
# the allocation chosen under nearest rounding, applied with the shipped GPTQ (paired with the rows above)
$M bench -q --model resnet20 $RTN --methods auto,eval-delta --budgets "avg-bits=2.5;avg-bits=3" \
    --ptq gptq --splits test --draws 5 --out $R/draws_resnet20_rtnalloc
# MobileNetV2 (ImageNet subset, 128 calibration images), 3 draws
$M bench -q --model mobilenetv2 --methods uniform,eval-delta --budgets "avg-bits=3:5:1" --ptq default --splits test \
    --calib-size 128 --draws 3 --out $R/bench_mobilenetv2_gptq
$M bench -q --model mobilenetv2 --methods uniform --budgets "avg-bits=6;avg-bits=8" --ptq default --splits test \
    --calib-size 128 --draws 3 --out $R/bench_mobilenetv2_gptq
$M bench -q --model mobilenetv2 $RTN --methods eval-delta --budgets avg-bits=4 --ptq gptq --splits test \
    --calib-size 128 --draws 3 --out $R/bench_mobilenetv2_rtnalloc
# the same plans re-applied after the calibration chunks were sized by the input (953c1d6): how far rows move
PYTHONPATH=src .venv/bin/python benchmarks/recheck_rows.py --dir $R/bench_mobilenetv2_gptq --model mobilenetv2 \
    --pick "eval-delta,avg-bits=3,0" --pick "eval-delta,avg-bits=4,0" --pick "uniform,avg-bits=4,0" \
    --pick "eval-delta,avg-bits=4,1" --out $R/bench_mobilenetv2_gptq/recheck.jsonl
# ConvMixer-256/8 (CIFAR-10, 1,024 calibration images), 3 draws
$M bench -q --model convmixer --methods uniform,eval-delta --budgets avg-bits=3:5:1 --ptq default --splits test \
    --draws 3 --out $R/bench_convmixer_gptq
# MiniLM-SST2 (128 calibration phrases), 3 draws
$M bench -q --model minilm-sst2 --methods uniform,eval-delta --budgets "avg-bits=3;avg-bits=4" --ptq default --splits test \
    --calib-size 128 --draws 3 --out $R/bench_minilm_sst2_gptq
# EfficientNet-Lite0, 3 draws
$M bench -q --model efficientnet-lite0 --methods eval-delta,uniform --budgets "avg-bits=3:5:1" --ptq default \
    --splits test --calib-size 128 --draws 3 --out $R/bench_efficientnet_lite0_gptq
$M bench -q --model efficientnet-lite0 --methods uniform --budgets "avg-bits=6;avg-bits=8" --ptq default --splits test \
    --calib-size 128 --draws 3 --out $R/bench_efficientnet_lite0_gptq
# the grid GPTQ rounds on: each candidate grid alone vs the per-channel choice (uniform plans, draw 0)
PYTHONPATH=src .venv/bin/python benchmarks/gptq_grid.py --model resnet20 --bits 2,3,4
# issue 27's claims, each a paired difference over the calibration draws (equal size: integer budgets vs uniform)
G=$R/draws_resnet20_gptq
.venv/bin/python benchmarks/claims.py --out $G/paired_claims.md --title "The quantizer the plans deserve (issue 27)" \
    --claim "GPTQ > nearest rounding (auto's plans);$G;auto;$G;auto@nearest" \
    --claim "auto + GPTQ (this default) > auto + BRECQ-500 (plans chosen under nearest rounding);$G;auto;$R/draws_resnet20;auto@brecq;avg-bits=3" \
    --claim "GPTQ+BC > GPTQ (auto's plans);$G;auto@gptq+bc;$G;auto" \
    --claim "GPTQ (the default) > BRECQ-500 (the same auto plans);$G;auto;$G;auto@brecq;avg-bits=2.5,avg-bits=4" \
    --claim "sequential GPTQ > layer-local GPTQ (auto's plans);$G;auto@gptq-seq;$G;auto" \
    --claim "CLE+GPTQ > GPTQ (auto's plans);$G;auto@cle+gptq;$G;auto" \
    --claim "auto > uniform (GPTQ, equal size);$G;auto;$G;uniform;avg-bits=3,avg-bits=4" \
    --claim "auto > eval-delta (GPTQ);$G;auto;$G;eval-delta" \
    --claim "auto: allocation under GPTQ > under nearest rounding (both shipped with GPTQ);$G;auto;$R/draws_resnet20_rtnalloc;auto@gptq" \
    --claim "eval-delta: allocation under GPTQ > under nearest rounding;$G;eval-delta;$R/draws_resnet20_rtnalloc;eval-delta@gptq" \
    --claim "GPTQ > nearest rounding (uniform);$G;uniform;$G;uniform@nearest;avg-bits=3"
B=$R/bench_mobilenetv2_gptq
.venv/bin/python benchmarks/claims.py --out $B/paired_claims.md --title "MobileNetV2: the quantizer and the allocation (issue 27)" \
    --claim "eval-delta > uniform (equal size);$B;eval-delta;$B;uniform;avg-bits=3,avg-bits=4,avg-bits=5" \
    --claim "eval-delta: allocation under GPTQ > under nearest rounding;$B;eval-delta;$R/bench_mobilenetv2_rtnalloc;eval-delta@gptq"
T=$R/bench_minilm_sst2_gptq
.venv/bin/python benchmarks/claims.py --out $T/paired_claims.md --title "MiniLM-SST2 under GPTQ (issue 27)" \
    --claim "eval-delta > uniform (GPTQ, equal size);$T;eval-delta;$T;uniform;avg-bits=3,avg-bits=4" \
    --claim "GPTQ > nearest rounding (eval-delta, old RTN rows);$T;eval-delta;$R/bench_minilm_sst2;eval-delta;avg-bits=4" \
    --claim "GPTQ > nearest rounding (uniform, old RTN rows);$T;uniform;$R/bench_minilm_sst2;uniform;avg-bits=4"
# issue 30: LSQ fine-tuning of the GPTQ plans (3 epochs of 20,000 train images, Adam lr 3e-4), paired over draws
FT=$R/finetune_resnet20
FTA="--src $R/draws_resnet20_gptq --out $FT --methods auto,uniform --budgets avg-bits=2.5,avg-bits=3 --epochs 3 --train-size 20000"
.venv/bin/python benchmarks/finetune_plans.py $FTA --draws 0,1,2 --lr 3e-4 --jobs 2
.venv/bin/python benchmarks/finetune_plans.py $FTA --draws 0,1 --lr 3e-4 --steps linear --jobs 2 --methods auto  # steps as s
.venv/bin/python benchmarks/finetune_plans.py $FTA --draws 0,1 --lr 3e-4 --steps linear --methods uniform --budgets avg-bits=2.5
.venv/bin/python benchmarks/finetune_plans.py $FTA --draws 0 --lr 3e-4 --steps linear --methods uniform --budgets avg-bits=3
.venv/bin/python benchmarks/finetune_plans.py $FTA --draws 0 --methods auto --budgets avg-bits=3 --steps linear  # lr 1e-4
.venv/bin/python benchmarks/finetune_plans.py $FTA --draws 0,1,2 --methods auto --budgets avg-bits=3 --epochs 10 --lr 3e-4
.venv/bin/python benchmarks/finetune_plans.py $FTA --draws 0,1,2 --methods auto --budgets avg-bits=3 --epochs 10 --lr 3e-4 \
    --train-norm  # the norm layers' scale and shift trained too
.venv/bin/python benchmarks/finetune_plans.py $FTA --draws 0 --methods auto --budgets avg-bits=3 --epochs 1 --epochs-list 2,5 \
    --lr 3e-4
.venv/bin/python benchmarks/finetune_plans.py --src $R/bench_convmixer_gptq --out $R/finetune_convmixer --model convmixer \
    --methods eval-delta,uniform --budgets avg-bits=3 --draws 0 --epochs 3 --train-size 20000 --lr 3e-4
.venv/bin/python benchmarks/finetune_plans.py --src $R/bench_resnet56_ft --out $R/finetune_resnet56 --model resnet56 \
    --methods auto --budgets avg-bits=3 --draws 0 --epochs 3 --train-size 20000 --lr 3e-4
L=lsq-3ep-lr0.0003-20000img
.venv/bin/python benchmarks/claims.py --out $FT/paired_claims.md --title "Fine-tuning the plans (issue 30)" \
    --claim "fine-tuned > PTQ only (auto);$FT;auto@$L;$FT;auto" \
    --claim "fine-tuned > PTQ only (uniform);$FT;uniform@$L;$FT;uniform" \
    --claim "auto > uniform after fine-tuning (equal size);$FT;auto@$L;$FT;uniform@$L;avg-bits=3" \
    --claim "log steps > linear steps (auto);$FT;auto@$L;$FT;auto@$L-linsteps" \
    --claim "log steps > linear steps (uniform);$FT;uniform@$L;$FT;uniform@$L-linsteps" \
    --claim "10 epochs > 3 epochs (auto);$FT;auto@lsq-10ep-lr0.0003-20000img;$FT;auto@$L;avg-bits=3" \
    --claim "norm affine trained > frozen (auto, 10 epochs);$FT;auto@lsq-10ep-lr0.0003-20000img-norm;$FT;auto@lsq-10ep-lr0.0003-20000img;avg-bits=3"
# issue 28: what a cold search costs (seconds, peak resident memory), one process per method, the 2 cores otherwise idle
C="PYTHONPATH=src .venv/bin/python benchmarks/search_cost.py"
eval $C --model resnet20 --methods auto --budgets avg-bits=3 --draws 5 --out $R/cost_resnet20
eval $C --model resnet20 --methods auto --budgets avg-bits=3 --draws 5 --out $R/cost_resnet20_nogreedy \
    -- --auto-methods uniform,eval-delta,mpqco,mixquant-ilp
.venv/bin/python benchmarks/claims.py --out $R/cost_resnet20/paired_claims.md --title "What auto's search costs (issue 28)" \
    --claim "auto, pruned probes, cold (this directory) vs auto of draws_resnet20_gptq (same seeds);$R/cost_resnet20;auto;$G;auto" \
    --claim "auto without greedy > auto with its default candidates;$R/cost_resnet20_nogreedy;auto;$R/cost_resnet20;auto"
eval $C --model mobilenetv2 --methods infoq --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 1800 \
    --out $R/cost_mobilenetv2
# CLADO at its default bit-widths, cold (ResNet-20); auto cold on the larger models, default settings (no --max-memory:
# the prefix cache is sized within memory.DEFAULT_TARGET_MB)
# (cost_resnet20_clado: the pairs on all 1,024 samples, as before --pair-samples; draw 2 ran in a second process)
eval $C --model resnet20 --methods clado --budgets avg-bits=3 --draws 3 --timeout 1800 --out $R/cost_resnet20_clado \
    -- --pair-samples 0
# the cross terms on 256 samples: the draw's first 256 (a uniform subset), then 256 drawn by importance
eval $C --model resnet20 --methods clado --budgets avg-bits=3 --draws 3 --timeout 1800 \
    --out $R/cost_resnet20_clado_first256 -- --pair-samples 256 --pair-draw first
.venv/bin/python benchmarks/paired_dirs.py --base $R/cost_resnet20_clado --other $R/cost_resnet20_clado_first256 \
    --name pair_samples --base-label "pairs on 1,024" --other-label "pairs on the first 256" \
    --title "CLADO: cross terms on the first 256 of the 1,024 calibration samples vs on all (issue 28)"
eval $C --model resnet20 --methods clado --budgets avg-bits=3 --draws 3 --timeout 1800 \
    --out $R/cost_resnet20_clado_pairs256 -- --pair-samples 256
.venv/bin/python benchmarks/paired_dirs.py --base $R/cost_resnet20_clado --other $R/cost_resnet20_clado_pairs256 \
    --name pair_samples --base-label "pairs on 1,024" --other-label "pairs on 256 by importance" \
    --title "CLADO: cross terms on 256 samples drawn by importance vs on all 1,024 (issue 28)"
eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 3 --timeout 2400 \
    --out $R/cost_mobilenetv2_auto
# the same after e66d0cd (search collects its probe engines before returning), 2 draws: the later draw's peak
eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 2 --timeout 1500 \
    --out $R/cost_mobilenetv2_auto_gc
# the same 2-draw process with each stage's resident peak sampled (d829067), then with the freed C heap handed back
# after each search and each plan's PTQ + evaluation (9dd9207)
eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 2 --timeout 2400 \
    --out $R/cost_mobilenetv2_auto_peaks
eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 2 --timeout 2400 \
    --out $R/cost_mobilenetv2_auto_trim
# the 2-draw process with glibc's mmap threshold fixed at 4 MiB (no dynamic threshold): large tensors never sit in the heap
MALLOC_MMAP_THRESHOLD_=4194304 eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 \
    --draws 2 --timeout 2700 --out $R/cost_mobilenetv2_auto_mmap4m
# the 2-draw process after bb4106f (the engine keeps its layer cuts in pages of their own, the heap trimmed after a move)
eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 2 --timeout 3000 \
    --out $R/cost_mobilenetv2_auto_offheap
# draw 1 of the above (seed 1) alone in a fresh process
eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 2400 \
    --out $R/cost_mobilenetv2_auto_seed1 -- --seed 1
eval $C --model efficientnet-lite0 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 1800 \
    --out $R/cost_efficientnet_lite0_auto
# two more draws of auto with uniform and eval-delta beside them at today's code (68246fc), resuming the directory
$M bench -q --model efficientnet-lite0 --methods auto,uniform,eval-delta --budgets avg-bits=4 --ptq default \
    --splits test --draws 3 --calib-size 128 --out $R/cost_efficientnet_lite0_auto
# auto, 2 draws in one process, after bb4106f (the kept layer cuts off the heap)
eval $C --model efficientnet-lite0 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 2 --timeout 3000 \
    --out $R/cost_efficientnet_lite0_auto_offheap
eval $C --model minilm-sst2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 1800 \
    --out $R/cost_minilm_sst2_auto
# two more draws of auto and, beside them, uniform and eval-delta at today's code (9dd9207; eval-delta runs after
# auto in each draw, so its probes are warm), resuming the directory above
$M bench -q --model minilm-sst2 --methods auto,uniform,eval-delta --budgets avg-bits=4 --ptq default --splits test \
    --draws 3 --calib-size 128 --out $R/cost_minilm_sst2_auto
PYTHONPATH=src .venv/bin/python benchmarks/clado_pair_replay.py --dir $R/cost_resnet20_clado --model resnet20 \
    --tols 0.1,0.2,0.5 --budgets 3
# eval-delta on MobileNetV2 at today's code (bench_mobilenetv2_gptq's rows predate 953c1d6's calibration chunks), cold
eval $C --model mobilenetv2 --methods eval-delta --budgets avg-bits=4 --calib-size 128 --draws 3 --timeout 3600 \
    --out $R/cost_mobilenetv2_evaldelta
.venv/bin/python benchmarks/claims.py --out $R/cost_mobilenetv2_auto/paired_claims.md \
    --title "auto cold on the larger models vs the rows before it (issue 28)" \
    --claim "MobileNetV2: auto (cold) vs eval-delta + GPTQ (rows before 953c1d6);$R/cost_mobilenetv2_auto;auto;$R/bench_mobilenetv2_gptq;eval-delta" \
    --claim "MobileNetV2: auto (cold) vs eval-delta + GPTQ, both at today's code;$R/cost_mobilenetv2_auto;auto;$R/cost_mobilenetv2_evaldelta;eval-delta" \
    --claim "MobileNetV2: auto (cold) vs uniform + GPTQ;$R/cost_mobilenetv2_auto;auto;$R/bench_mobilenetv2_gptq;uniform" \
    --claim "EfficientNet-Lite0: auto (cold) vs eval-delta + GPTQ;$R/cost_efficientnet_lite0_auto;auto;$R/bench_efficientnet_lite0_gptq;eval-delta" \
    --claim "EfficientNet-Lite0: auto vs uniform + GPTQ, both at today's code;$R/cost_efficientnet_lite0_auto;auto;$R/cost_efficientnet_lite0_auto;uniform" \
    --claim "EfficientNet-Lite0: auto vs eval-delta + GPTQ, both at today's code;$R/cost_efficientnet_lite0_auto;auto;$R/cost_efficientnet_lite0_auto;eval-delta" \
    --claim "MiniLM-SST2: auto (cold) vs uniform + GPTQ;$R/cost_minilm_sst2_auto;auto;$R/bench_minilm_sst2_gptq;uniform" \
    --claim "MiniLM-SST2: auto vs uniform + GPTQ, both at today's code;$R/cost_minilm_sst2_auto;auto;$R/cost_minilm_sst2_auto;uniform" \
    --claim "MiniLM-SST2: auto vs eval-delta + GPTQ, both at today's code;$R/cost_minilm_sst2_auto;auto;$R/cost_minilm_sst2_auto;eval-delta"
# issue 28: peak resident memory under --max-memory 4000 (MobileNetV2, 128 images; timeouts 1,200 s)
eval $C --model mobilenetv2 --methods mpqco,hawq,infoq,eval-delta --budgets avg-bits=4 --calib-size 128 --draws 1 \
    --timeout 1200 --out $R/memory_mobilenetv2 -- --max-memory 4000
# the same for four more methods (later processes, timeouts 900 / 720 s)
eval $C --model mobilenetv2 --methods mpqco,hawq,infoq,eval-delta,uniform,mixquant,mixquant-ilp --budgets avg-bits=4 \
    --calib-size 128 --draws 1 --timeout 900 --out $R/memory_mobilenetv2 -- --max-memory 4000
eval $C --model mobilenetv2 --methods clado-diag --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 720 \
    --out $R/memory_mobilenetv2 -- --max-memory 4000
eval $C --model mobilenetv2 --methods greedy --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 1500 \
    --out $R/memory_mobilenetv2 -- --max-memory 4000
# smpq / dmpq with chunked training steps (7c350e4); a short supernet (3 epochs, 1 permutation): the memory of the
# default's steps, not its hours of Shapley forwards on 2 cores
eval $C --model mobilenetv2 --methods smpq,dmpq --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 1800 \
    --out $R/memory_mobilenetv2 -- --max-memory 4000 --epochs 3 --warmup 2 --permutations 1
eval $C --model mobilenetv2 --methods clado --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 1200 \
    --out $R/memory_mobilenetv2 -- --max-memory 4000
# auto under the limit, one draw, one process (its multi-draw processes: cost_mobilenetv2_auto*); eval-delta's
# record measured again after e96d055 (the prefix cache leaves 256 MB below the limit) by the first line's command,
# its record before that (4,038 MB) moved to memory_mobilenetv2_before_headroom
eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 1800 \
    --out $R/memory_mobilenetv2 -- --max-memory 4000
# auto under the limit, 2 draws in one process, after bb4106f (the kept layer cuts off the heap)
eval $C --model mobilenetv2 --methods auto --budgets avg-bits=4 --calib-size 128 --draws 2 --timeout 3000 \
    --out $R/memory_mobilenetv2_auto_draws -- --max-memory 4000
# infoq again with a longer limit (its record at the 1,200 s kill removed from cost.jsonl first): it finishes
eval $C --model mobilenetv2 --methods infoq --budgets avg-bits=4 --calib-size 128 --draws 1 --timeout 3600 \
    --out $R/memory_mobilenetv2 -- --max-memory 4000
# where the plan's PTQ spends its memory: the activation-range calibration pass, as is / whole-batch observer updates / none,
# with mpqkit's chunk (27 images at 224 x 224) and with all 128 images in one forward (before the chunk was sized by the input)
PYTHONPATH=src .venv/bin/python benchmarks/calib_memory.py --model mobilenetv2 --data imagenet-subset --calib-size 128 \
    --chunks 0,128 --out $R/memory_mobilenetv2/calib_memory.jsonl
# stacked probes (--stack-probes 6) against one forward per probe, the same probes, one process
OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/stack_speed.py --model resnet20 --stack 6 --calib 1024 \
    --out $R/stack_speed_resnet20.json
# what HAWQ's Hessian-vector products cost against a forward + backward (why hawq measures Fisher traces there)
PYTHONPATH=src .venv/bin/python benchmarks/hawq_hvp_cost.py --model mobilenetv2 --images 8 --repeats 1 \
    --out $R/hawq_mobilenetv2/hvp_cost.json
# the multi-draw tables first; the older single-draw directories carry a note.md saying what they are
$M report $R/draws_resnet20_gptq $R/cost_resnet20 $R/cost_resnet20_nogreedy $R/draws_resnet20_rtnalloc $R/bench_mobilenetv2_gptq $R/bench_mobilenetv2_rtnalloc \
    $R/cost_resnet20_clado $R/cost_resnet20_clado_first256 $R/cost_resnet20_clado_pairs256 \
    $R/cost_mobilenetv2_auto $R/cost_mobilenetv2_auto_gc $R/cost_mobilenetv2_auto_peaks $R/cost_mobilenetv2_auto_trim $R/cost_mobilenetv2_auto_seed1 \
    $R/cost_mobilenetv2_auto_mmap4m $R/cost_mobilenetv2_auto_offheap $R/memory_mobilenetv2_auto_draws $R/cost_efficientnet_lite0_auto_offheap \
    $R/memory_mobilenetv2_before_headroom $R/cost_efficientnet_lite0_auto \
    $R/cost_minilm_sst2_auto $R/cost_mobilenetv2_evaldelta \
    $R/cost_mobilenetv2 $R/memory_mobilenetv2 $R/bench_efficientnet_lite0_gptq $R/bench_convmixer_gptq $R/bench_minilm_sst2_gptq $R/finetune_resnet20 $R/finetune_convmixer $R/finetune_resnet56 \
    $R/draws_resnet20 $R/objective_resnet20_kl $R/draws_resnet20_refine $R/draws_resnet20_brecq2000 $R/draws_resnet20_brecq5000 $R/draws_resnet20_clado \
    $R/draws_resnet20_clado_allpairs $R/draws_resnet20_smpq $R/draws_resnet20_smpq_fill $R/draws_resnet20_smpq_layer $R/draws_resnet20_smpq_layer_pretrained \
    $R/draws_resnet20_mixquant_relative $R/draws_resnet20_mixquant_weighted \
    $R/bench_mobilenetv2 $R/bench_mobilenetv2_mpqco_logit $R/draws_resnet20_mpqco_logit $R/bench_convmixer $R/bench_resnet56_ft $R/bench_minilm_sst2 $R/bench_efficientnet_lite0 \
    $R/bench_resnet20 $R/bench_resnet20_clado $R/bench_resnet56 $R/bench_resnet56_clado --markdown docs/RESULTS.md
