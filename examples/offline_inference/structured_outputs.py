"""Structured outputs: a JSON schema, a choice and a regex hold the default model's replies to a shape."""

import json

from distgen import LLM, SamplingParams, StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def main() -> None:
    llm = LLM()
    try:
        asks = [
            ("Describe a person named Bob who is 30, as JSON.", StructuredOutputsParams(json=PERSON)),
            (
                "Is 'I love this film' positive or negative?",
                StructuredOutputsParams(choice=["positive", "negative"]),
            ),
            ("Write a date like 2024-05-17.", StructuredOutputsParams(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}")),
        ]
        conversations = [[{"role": "user", "content": q}] for q, _ in asks]
        params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=s) for _, s in asks]
        outs = llm.chat(conversations, params, use_tqdm=False)
        person = json.loads(outs[0].outputs[0].text)
        print(f"person: {person['name']}, {person['age']}")
        print(f"sentiment: {outs[1].outputs[0].text}")
        print(f"date: {outs[2].outputs[0].text}")
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
