"""Stream tokens as they are generated, with sampling settings.

python examples/stream.py dist/smollm2
"""

import sys

import edgelm

lm = edgelm.load(sys.argv[1] if len(sys.argv) > 1 else "dist/smollm2")
for piece in lm.stream(
    "Write a haiku about small language models.", max_new_tokens=48, temperature=0.7, top_p=0.9, seed=0, stop=("\n\n",)
):
    print(piece, end="", flush=True)
print()
