#!/usr/bin/env bash
# The main job: install what is missing, build geek, fetch the default model, build the default
# passage index (StrategyQA paragraphs + Wikipedia vital articles from ../shared/data), answer a
# question with the excavation agent.
#   bash run.sh ["QUESTION"]
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-deps.sh
echo "building geek (the first build compiles llama.cpp: about 5-8 minutes on 2 cores)..." >&2
cargo build --release -p geek-tui
geek="${CARGO_TARGET_DIR:-target}/release/geek"

"$geek" model pull >/dev/null
# The test suite's small model, so that the README's second command runs as it is.
"$geek" model pull smollm2-135m-instruct-q4_1 >/dev/null
# The sentence encoder of dense retrieval (90 MB), which the tests check too.
"$geek" model pull all-minilm-l6-v2 >/dev/null
index="${GEEK_INDEX:-$HOME/.local/share/geek/index}"
if [ ! -f "$index/geek-index.json" ]; then
  "$geek" index build --index "$index"
fi
question="${1:-Could a llama give birth twice during the Vietnam War?}"
echo "Question: $question"
"$geek" ask --index "$index" "$question"
