"""Generate text from an edgelm bundle inside a Python app.

python examples/generate.py dist/smollm2 ["your prompt"]
"""

import sys

import edgelm

bundle = sys.argv[1] if len(sys.argv) > 1 else "dist/smollm2"
prompt = sys.argv[2] if len(sys.argv) > 2 else "What is a KV cache?"

lm = edgelm.load(bundle, device="cpu", threads=2)
print(lm.generate(prompt, max_new_tokens=64))
