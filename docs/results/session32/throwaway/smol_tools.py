"""Does SmolLM2-135M-Instruct call functions? SmolLM2's own tool format (its 1.7B model card's system
prompt, <tool_call>[...]</tool_call>), three questions, greedy, Medusa and plain (their texts must be equal).
Run from the repository root: python docs/results/session32/throwaway/smol_tools.py"""

import json

import runtime

SYSTEM = """You are an expert in composing functions. You are given a question and a set of possible functions.
Based on the question, you will need to make one or more function/tool calls to achieve the purpose.
If none of the functions can be used, point it out and refuse to answer.
If the given question lacks the parameters required by the function, also point it out.

You have access to the following tools:
<tools>{tools}</tools>

The output MUST strictly adhere to the following format, and NO other text MUST be included.
The example format is as follows. Please make sure the parameter type is correct. If no function call is needed, please make the tool calls an empty list '[]'.
<tool_call>[
{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},
... (more tool calls as required)
]</tool_call>"""
tools = [
    {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city"}},
            "required": ["city"],
        },
    },
    {
        "name": "get_time",
        "description": "Get the current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
]
g = runtime.load("artifacts/smollm2-135m-medusa", threads=2)  # scripts/main.sh exports it
for q in [
    "What is the weather like in Paris?",
    "What time is it in Tokyo?",
    "What's the weather in Berlin and the time in CET?",
]:
    msgs = [{"role": "system", "content": SYSTEM.format(tools=json.dumps(tools))}, {"role": "user", "content": q}]
    out = g.generate(msgs, max_new_tokens=80, temperature=0)
    plain = g.generate(msgs, max_new_tokens=80, temperature=0, medusa=False)
    print(repr(out.text), out.text == plain.text, out.stats.mean_accepted)
