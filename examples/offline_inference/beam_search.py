"""Beam search: keep the best few continuations at every step; sequences come back best first."""

from distgen import LLM
from distgen.sampling_params import BeamSearchParams

llm = LLM()
beams = llm.beam_search([{"prompt": "Hello, my name is "}], BeamSearchParams(beam_width=3, max_tokens=20))
for i, seq in enumerate(beams[0].sequences):
    print(f"{i}: cum_logprob={seq.cum_logprob:.2f} {seq.text!r}")
