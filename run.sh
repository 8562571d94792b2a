#!/usr/bin/env bash
# The main job: install what is missing, build geek, fetch the default model, answer a question.
#   bash run.sh ["QUESTION"]
set -euo pipefail
cd "$(dirname "$0")"

scripts/install-deps.sh
echo "building geek (the first build compiles llama.cpp: about 5-8 minutes on 2 cores)..." >&2
cargo build --release -p geek-tui
geek="${CARGO_TARGET_DIR:-target}/release/geek"

"$geek" model pull >/dev/null
question="${1:-Could a llama give birth twice during the Vietnam War? Answer yes or no, then explain.}"
echo "Q: $question"
"$geek" generate --max-tokens 128 "$question"
