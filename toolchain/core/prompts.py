"""Fixed texts every target is measured on: the quality text, greedy prompts and the bench prompt.

They are part of the reference stage's config, so changing them re-measures every target.
"""
from __future__ import annotations

# Held-out prose for perplexity / KL / top-1 (written for this project).
QUALITY_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small tin of oil "
    "and a cloth for the lens. In winter the wind came straight off the sea, and the glass rattled in its "
    "frame. She kept a logbook on the desk by the window: the time the lamp was lit, the ships that passed, "
    "and the weather, written in a careful hand. Most nights were quiet. Once, in a storm that lasted three "
    "days, a fishing boat lost its engine and drifted toward the rocks, and she watched its lights through "
    "the rain until the lifeboat reached it.\n\n"
    "To make bread, mix flour, water, salt and yeast, then knead the dough until it is smooth and elastic. "
    "Let it rise in a warm place for about an hour, shape it into a loaf, and bake it in a hot oven until "
    "the crust is brown and the bottom sounds hollow when tapped.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
    "chloroplasts of plant cells, where chlorophyll absorbs mostly red and blue light."
)

# Chat prompts whose greedy continuation must match the reference on every target.
GREEDY_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "List three primary colours."}],
    [{"role": "user", "content": "Explain in one sentence what a compiler does."}],
    [{"role": "user", "content": "Give me a tip for learning to cook."}],
    [{"role": "user", "content": "What is 12 times 7?"}],
]

# The benchmark prompt: long enough for prompt_tokens up to a few hundred tokens.
BENCH_PROMPT = [{"role": "user", "content": "Summarise the following text in two sentences.\n\n" + QUALITY_TEXT}]

# Calibration prose (never the quality text): varied registers so activations cover more than
# the fine-tuning task.
CALIBRATION_TEXTS = [
    "The committee met on Tuesday to review the budget. After a long discussion about road repairs, "
    "the library's opening hours and a new bus route, the members agreed to postpone the vote until "
    "the engineers had finished their survey of the old bridge.",
    "Q: How do I reverse a list in Python?\nA: Use slicing, items[::-1], or call items.reverse() to "
    "reverse it in place. The built-in reversed(items) returns an iterator instead of a new list.",
    "Rain fell all night on the mountain village. In the morning the river was brown and fast, and "
    "children stood on the stone bridge to watch branches spin past beneath them.",
    "SELECT name, COUNT(*) AS orders FROM customers JOIN orders ON orders.customer_id = customers.id "
    "GROUP BY name ORDER BY orders DESC LIMIT 10;",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures high in the mountains, "
    "because the air pressure is lower there. That is why pasta takes longer to cook at altitude.",
    "Dear Ms. Patel, thank you for your letter of 3 May. I am pleased to confirm your appointment on "
    "the 14th at 10:30. Please bring your passport and the signed form. Kind regards, J. Moreau",
]

# strings and conversations every target's tokenizer and chat template must reproduce token for token
CHECK_STRINGS = (
    "Hello, world!", "  leading and trailing spaces  ", "Tabs\tand\nnew\n\nlines\r\n",
    "Numbers: 3.14159, 2024-01-05, 1,000,000 and 0x1F.", "Ünïcödé àccents, 日本語のテキスト, emoji 🤖🚀",
    "def f(x):\n    return x ** 2  # code", "I'm sure they'll say we've won't", "",
)
CHECK_CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Convert 5 January 2024 to ISO format."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
)
