"""Writes the demo datasets shipped in launcher/assets/ (deterministic; rerun to regenerate).

Preference rows in the seed dataset's format (prompt / chosen / rejected strings), half English,
half Chinese: the chosen answer helps and is right, the rejected one brushes the user off or is
wrong. The same kinds of questions make the SFT rows (prompt / completion).
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "launcher" / "assets"
CAPITALS = [("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("China", "Beijing", "中国", "北京"),
            ("Germany", "Berlin", "德国", "柏林"), ("Italy", "Rome", "意大利", "罗马"), ("Spain", "Madrid", "西班牙", "马德里"),
            ("Egypt", "Cairo", "埃及", "开罗"), ("Canada", "Ottawa", "加拿大", "渥太华"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
            ("India", "New Delhi", "印度", "新德里"), ("Brazil", "Brasilia", "巴西", "巴西利亚"), ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
            ("Greece", "Athens", "希腊", "雅典"), ("Peru", "Lima", "秘鲁", "利马"), ("Norway", "Oslo", "挪威", "奥斯陆"),
            ("Thailand", "Bangkok", "泰国", "曼谷"), ("Vietnam", "Hanoi", "越南", "河内"), ("Poland", "Warsaw", "波兰", "华沙")]
WORDS = [("apple", "苹果"), ("water", "水"), ("book", "书"), ("friend", "朋友"), ("sun", "太阳"), ("moon", "月亮"),
         ("cat", "猫"), ("dog", "狗"), ("tea", "茶"), ("school", "学校"), ("river", "河"), ("mountain", "山"),
         ("city", "城市"), ("music", "音乐"), ("teacher", "老师"), ("computer", "电脑")]
RUDE_EN = ["I don't know. Figure it out yourself.", "Why would I tell you? Look it up.", "No idea, and I don't care.",
           "Stop asking me such boring questions."]
RUDE_ZH = ["不知道，自己查去。", "这种问题别来问我。", "懒得回答，你自己想。", "我不关心这个问题。"]


def pairs(rng: random.Random):
    """(prompt, good answer, wrong answer) triples, English and Chinese."""
    for _ in range(120):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        wrong = a + b + rng.choice([-3, -1, 2, 5])
        yield f"What is {a} + {b}?", f"{a} + {b} = {a + b}. Happy to help!", f"{a} + {b} = {wrong}."
        yield f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。很高兴帮你！", f"{a}加{b}等于{wrong}。"
    for _ in range(60):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        yield f"What is {a} times {b}?", f"{a} times {b} is {a * b}. Happy to help!", f"{a} times {b} is {a * b + 1}."
        yield f"{a}乘以{b}是多少？", f"{a}乘以{b}等于{a * b}。很高兴帮你！", f"{a}乘以{b}等于{a * b + 1}。"
    for en, cap, zh, zcap in CAPITALS:
        yield f"What is the capital of {en}?", f"The capital of {en} is {cap}. Happy to help!", f"The capital of {en} is {rng.choice([c for c in CAPITALS if c[0] != en])[1]}."
        yield f"{zh}的首都是哪里？", f"{zh}的首都是{zcap}。很高兴帮你！", f"{zh}的首都是{rng.choice([c for c in CAPITALS if c[0] != en])[3]}。"
    for en, zh in WORDS:
        yield f"How do you say '{en}' in Chinese?", f"'{en}' in Chinese is '{zh}'. Happy to help!", f"'{en}' in Chinese is '{rng.choice([w for w in WORDS if w[0] != en])[1]}'."
        yield f"“{zh}”用英语怎么说？", f"“{zh}”的英语是“{en}”。很高兴帮你！", f"“{zh}”的英语是“{rng.choice([w for w in WORDS if w[0] != en])[0]}”。"


def main() -> None:
    rng = random.Random(0)
    rows = list(pairs(rng))
    rng.shuffle(rows)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "demo_pref.jsonl", "w", encoding="utf-8") as f:
        for prompt, good, wrong in rows:
            zh = not prompt.isascii()
            rejected = rng.choice(RUDE_ZH if zh else RUDE_EN) if rng.random() < 0.6 else wrong
            f.write(json.dumps({"prompt": prompt, "chosen": good, "rejected": rejected}, ensure_ascii=False) + "\n")
    with open(OUT / "demo_sft.jsonl", "w", encoding="utf-8") as f:
        for prompt, good, _ in rows:
            f.write(json.dumps({"prompt": prompt, "completion": good}, ensure_ascii=False) + "\n")
    print(len(rows), "rows ->", OUT)


if __name__ == "__main__":
    main()
