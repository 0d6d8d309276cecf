"""Profile an artifact the way an app uses it, and print llama-bench style numbers.

python examples/profile_artifact.py dist/smollm2
"""

import json
import sys

import edgelm

lm = edgelm.load(sys.argv[1] if len(sys.argv) > 1 else "dist/smollm2", threads=2)
profile = lm.profile(max_new_tokens=64, repeats=2)
print(json.dumps(profile.to_dict()["metrics"], indent=2))
print(f"TTFT {profile.ttft_s:.3f} s, decode {profile.decode_tok_s:.1f} tok/s, peak RSS {profile.peak_rss_mb:.0f} MB")
