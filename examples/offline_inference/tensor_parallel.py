"""Tensor parallelism: the model is sharded over 3 worker processes (SmolLM2 has 9 attention heads and
3 KV heads, so 3 ranks hold 3 heads and 1 KV head each). On a GPU node each rank gets its own GPU;
here the ranks are CPU processes talking over gloo. The output equals the single-process one."""

from distgen import LLM, SamplingParams

if __name__ == "__main__":  # the workers are spawned processes: keep module-level work under main
    prompts = ["The capital of France is", "Hello, my name is"]
    params = SamplingParams(temperature=0, max_tokens=24)
    llm = LLM(tensor_parallel_size=3, distributed_executor_backend="mp", kv_cache_memory=256 << 20)
    for out in llm.generate(prompts, params):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
    llm.shutdown()
