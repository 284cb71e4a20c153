#!/usr/bin/env bash
# RAIL continual learning on the device, end to end, with the vlm-edge command (no torch).
#
#   examples/continual_learning.sh BUNDLE DATA_ROOT DOMAIN1,DOMAIN2,... [SOURCE]
#
# BUNDLE: exported on the workstation with the union label space of the domains, e.g.
#   vlm-export --method tca+rail --model ViT-B-16 --pretrained openai \
#       --domain pets=pets.txt --domain cars=cars.txt --out bundles/xtail
# DATA_ROOT/<domain>/train/<class>/ holds labelled images, DATA_ROOT/<domain>/test/<class>/ the
# images to evaluate on (class folder names are the bundle's class names; "_" may stand for " ").
# SOURCE (optional): images, a video or a camera to classify with the learned state.
# RAIL_OPTIONS (environment): options for learn and eval, e.g. "--hidden-dim 4096" where the
# manifest's d_h = 15000 (a 1.8 GB matrix) is too large for the device; WORK: the output folder.
set -euo pipefail

bundle=${1:?usage: $0 BUNDLE DATA_ROOT DOMAIN1,DOMAIN2,... [SOURCE]}
root=${2:?usage: $0 BUNDLE DATA_ROOT DOMAIN1,DOMAIN2,... [SOURCE]}
order=${3:?usage: $0 BUNDLE DATA_ROOT DOMAIN1,DOMAIN2,... [SOURCE]}
source=${4:-}
work=${WORK:-rail-work}
read -r -a options <<<"${RAIL_OPTIONS:-}"
mkdir -p "$work"

# 1. Learn the domains one after another into one learner state (16 shots per class: the first
#    16 images of each class folder by file name). Each step also writes the small
#    predict-only state that a device without the d_h x d_h matrix can run.
IFS=, read -r -a domains <<<"$order"
for domain in "${domains[@]}"; do
    vlm-edge learn "$bundle" "$root/$domain/train" --domain "$domain" --shots 16 \
        --state "$work/learner.npz" --inference-state "$work/inference.npz" "${options[@]}"
done

# 2. Several devices: each learns its own domain from the same bundle and seed; merging adds
#    their statistics into exactly the learner that saw everything.
for domain in "${domains[@]}"; do
    vlm-edge learn "$bundle" "$root/$domain/train" --domain "$domain" \
        --state "$work/device-$domain.npz" "${options[@]}"
done
devices=()
for domain in "${domains[@]}"; do devices+=("$work/device-$domain.npz"); done
if ((${#devices[@]} > 1)); then
    vlm-edge merge "$work/merged.npz" "${devices[@]}" --bundle "$bundle"
fi

# 3. The X-TAIL protocol: learn in order, test every domain after every step; zero-shot,
#    primal and dual RAIL with Transfer, Average and Last (table on stdout, JSON for scripts).
vlm-edge eval "$bundle" "$root" --order "$order" --json "$work/xtail.json" "${options[@]}"

# 4. Classify with the learned state: TCA, then RAIL fusion (the bundle's method tca+rail).
if [[ -n "$source" ]]; then
    vlm-edge run "$bundle" "$source" --rail-state "$work/inference.npz" --out "$work/run.jsonl"
fi
