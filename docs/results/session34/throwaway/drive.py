"""N streaming openai clients against a server for S seconds (held-out Alpaca prompts, 128 tokens, greedy):
`python drive.py URL N S`; prints chunks/s."""

import sys
import threading
import time

import openai

from runtime.bench import load_prompts

url, conc, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
prompts = [p.text for p in load_prompts("runs/alpaca_tune.json")]
client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
stop = time.time() + secs
count = [0]


def worker(i: int) -> None:
    j = i
    while time.time() < stop:
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": prompts[j % len(prompts)]}]
        for _ in client.chat.completions.create(model=model, messages=messages, max_tokens=128, temperature=0,
                                                stream=True):  # fmt: skip
            count[0] += 1
        j += conc


t0 = time.time()
threads = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("chunks/s", count[0] / (time.time() - t0))
