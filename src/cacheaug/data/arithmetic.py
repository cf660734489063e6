"""The embedded, seeded generator of GSM8K-style arithmetic word problems with worked step-by-step solutions."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from .documents import gsm8k_document, render_document  # noqa: F401  (gsm8k_document: re-exported)

TRAIN_SEED = 0
VALIDATION_SEED = 1_000_003
MIN_STEPS = 2
MAX_STEPS = 5
_MAX_VALUE = 50_000  # keeps every number one a grade-school reader could compute by hand

_FEMALE = ("Lena", "Maria", "Aisha", "Sofia", "Priya", "Hannah", "Mei", "Olivia", "Fatima", "Chloe", "Grace",
           "Yuki", "Amara", "Elena", "Nora", "Zoe", "Ines", "Keiko", "Rosa", "Leila")
_MALE = ("Tom", "Omar", "Lucas", "Ravi", "Daniel", "Kenji", "Mateo", "Samuel", "Ali", "Jack", "Noah", "Diego",
         "Ethan", "Felix", "Hugo", "Kwame", "Leo", "Ivan", "Marco", "Tariq")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# (singular, plural, container, containers)
_OBJECTS = (
    ("pencil", "pencils", "box", "boxes"), ("marble", "marbles", "bag", "bags"),
    ("sticker", "stickers", "sheet", "sheets"), ("apple", "apples", "basket", "baskets"),
    ("egg", "eggs", "carton", "cartons"), ("cookie", "cookies", "tray", "trays"),
    ("trading card", "trading cards", "pack", "packs"), ("bead", "beads", "jar", "jars"),
    ("crayon", "crayons", "box", "boxes"), ("seashell", "seashells", "bucket", "buckets"),
    ("balloon", "balloons", "bag", "bags"), ("flower", "flowers", "bunch", "bunches"),
    ("stamp", "stamps", "album page", "album pages"), ("cupcake", "cupcakes", "tray", "trays"),
    ("orange", "oranges", "crate", "crates"), ("toy car", "toy cars", "box", "boxes"),
    ("button", "buttons", "jar", "jars"), ("muffin", "muffins", "basket", "baskets"),
)
_ITEMS = ("notebooks", "sandwiches", "T-shirts", "plants", "board games", "lamps", "pizzas", "bracelets",
          "comic books", "scarves", "mugs", "kites")
_THINGS = ("a new backpack", "lunch", "a movie ticket", "a birthday present", "art supplies", "a book",
           "groceries", "bus fare", "a haircut", "school supplies")
_EVENTS = ("concert", "museum", "zoo", "football game", "science fair", "school play", "aquarium")
_TASKS = ("homework problems", "emails", "paintings", "puzzles", "essays", "bike repairs", "phone calls")
_PRACTICE = ("the piano", "the violin", "the guitar", "chess", "drawing", "swimming")
_FRACTIONS = ((1, 2, "half"), (1, 3, "a third"), (1, 4, "a quarter"), (2, 3, "two thirds"),
              (3, 4, "three quarters"), (1, 5, "a fifth"), (2, 5, "two fifths"))
_PERCENTS = (5, 10, 20, 25, 30, 40, 50, 60, 75)
_TIMES = {2: "twice", 3: "three times", 4: "four times", 5: "five times"}
_CASH = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_FIELD = re.compile(r"\{(\w+)\}")
_EXTRAS = {"thing": _THINGS, "items": _ITEMS, "event": _EVENTS, "tasks": _TASKS, "what": _PRACTICE}


@dataclass(frozen=True)
class _Step:
    """A table entry: a start (two drawn numbers) or an operation on the running value."""

    kinds: str  # starts: the kind of quantity it creates; operations: the kinds they apply to
    draw: str  # how the numbers are drawn, see _draw
    a: range
    says: tuple[str, ...]  # question sentences (one is picked)
    solves: tuple[str, ...]  # solution sentences, each holding {calc}
    ask: str  # the question's final sentence when this is the last step
    b: range = range(0)  # second number of a start or of an "a*b" operation
    then: str = ""  # "+" or "-": a second step combining the value before with this step's result
    then_solves: tuple[str, ...] = ()
    terminal: bool = False  # the result means something new (a share, a count of boxes), so nothing follows
    becomes: str = ""  # the kind after this step, when it changes (selling turns a count into money)
    units: tuple[str, ...] = ()  # starts: the unit counted; operations: the unit of the result, if different
    extras: tuple[str, ...] = ()  # random words its templates use (keys of _EXTRAS, or "days")

    @property
    def steps(self) -> int:
        return 2 if self.then else 1


class _Story:
    """The running state of one problem: who, what is counted, its value, and the text so far."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        female = rng.random() < 0.5
        self.name = rng.choice(_FEMALE if female else _MALE)
        self.friend = self.name
        while self.friend == self.name:
            self.friend = rng.choice(_FEMALE + _MALE)
        self.he, self.him, self.his = ("she", "her", "her") if female else ("he", "him", "his")
        self.kind = "count"  # count | money (owned) | cost (to pay) | distance | track | minutes
        self.item, self.unit, self.container, self.containers = rng.choice(_OBJECTS)
        self.value = 0
        self.question: list[str] = []
        self.steps: list[str] = []
        self.ask = ""
        self.last: _Step | None = None  # the previous operation, not repeated while another one fits

    def fill(self, template: str, kw: dict[str, Any]) -> str:
        return template.format(name=self.name, friend=self.friend, he=self.he, He=self.he.capitalize(),
                               him=self.him, his=self.his, His=self.his.capitalize(), unit=self.unit, item=self.item,
                               container=self.container, containers=self.containers, **kw)

    def amount(self, value: int, unit: str) -> str:
        if unit:
            return f"{value} {unit}"
        return f"${value}" if self.kind in ("money", "cost") else f"{value} {self.unit}"

    def solve(self, templates: tuple[str, ...], expr: str, result: int, unit: str, kw: dict[str, Any]) -> None:
        calc = f"{expr} = {self.amount(result, unit)}"
        self.steps.append(self.fill(self.rng.choice(templates), {**kw, "calc": calc}))
        self.value = result


def _fraction_expr(value: int, num: int, den: int) -> str:
    return f"{value} / {den}" if num == 1 else f"{value} * {num} / {den}"


def _draw(step: _Step, v: int, rng: random.Random) -> tuple[str, int, dict[str, Any]] | None:
    """(expression, result, template values) for ``step`` applied to value ``v``, or None when it does not fit."""
    kind = step.draw
    if kind in ("a*b", "a+b", "a-b"):
        a = rng.choice(step.a)
        b_range = step.b if kind != "a-b" else range(step.b.start, min(step.b.stop, a))
        if not b_range:
            return None
        b = rng.choice(b_range)
        result = {"a*b": a * b, "a+b": a + b, "a-b": a - b}[kind]
        return f"{a} {kind[1]} {b}", result, {"a": a, "b": b, "times": _TIMES.get(b, f"{b} times")}
    if kind == "frac":
        options = [f for f in _FRACTIONS if v % f[1] == 0]
        if not options:
            return None
        num, den, word = rng.choice(options)
        return _fraction_expr(v, num, den), v * num // den, {"word": word}
    if kind == "pct":
        options = [p for p in _PERCENTS if p in step.a and v * p % 100 == 0]
        if not options:
            return None
        p = rng.choice(options)
        return f"{v} * {p} / 100", v * p // 100, {"p": p}
    if kind in ("total-", "cash-"):
        total = v + rng.choice(step.a) if kind == "total-" else next((c for c in _CASH if c > v), 0)
        return (f"{total} - {v}", total - v, {"total": total}) if total else None
    options = {"+": step.a, "-": range(step.a.start, min(step.a.stop, v)),
               "*": range(step.a.start, min(step.a.stop, _MAX_VALUE // max(v, 1) + 1)),
               "/": [k for k in step.a if v % k == 0 and k < v]}[kind]
    if not options:
        return None
    k = rng.choice(options)
    result = {"+": v + k, "-": v - k, "*": v * k, "/": v // k if kind == "/" else 0}[kind]
    return f"{v} {kind} {k}", result, {"k": k, "times": _TIMES.get(k, f"{k} times")}


def _apply(step: _Step, story: _Story) -> bool:
    """Add ``step``'s sentences to the story; False (and nothing changed) when its numbers do not fit."""
    rng, before = story.rng, story.value
    drawn = _draw(step, before, rng)
    if drawn is None:
        return False
    expr, result, kw = drawn
    for extra in step.extras:
        if extra == "days":
            kw["d1"], kw["d2"] = rng.sample(_DAYS, 2)
        else:
            kw[extra] = rng.choice(_EXTRAS[extra])
    story.kind = step.becomes or story.kind
    if step.draw in ("a*b", "a+b", "a-b") and step.units:
        story.unit = rng.choice(step.units)  # a start picks the unit its story counts in
    unit = story.fill(step.units[0], kw) if step.units and not step.becomes else ""
    if step.says:
        story.question.append(story.fill(rng.choice(step.says), kw))
    story.solve(step.solves, expr, result, unit, kw)
    if step.then:
        total = before + result if step.then == "+" else before - result
        story.solve(step.then_solves, f"{before} {step.then} {result}", total, "", kw)
    story.ask = story.fill(step.ask, kw)
    story.last = step
    return True


def _s(kinds: str, draw: str, a: range, says: tuple[str, ...] | str, solves: tuple[str, ...] | str, ask: str,
       **extra: Any) -> _Step:
    """A table entry, with single strings accepted where one variant is enough."""
    def wrap(templates: Any) -> tuple[str, ...]:
        return (templates,) if isinstance(templates, str) else templates

    extra = {key: wrap(value) if key in ("then_solves", "units") else value for key, value in extra.items()}
    says, solves = wrap(says), wrap(solves)
    used = set(_FIELD.findall(" ".join((*says, *solves, ask, *extra.get("then_solves", ()), *extra.get("units", ())))))
    extras = tuple(sorted(used & set(_EXTRAS))) + (("days",) if "d1" in used else ())
    return _Step(kinds, draw, a, says, solves, ask, extras=extras, **extra)


_R = range
_HAVE = "How many {unit} does {name} have?"
_STARTS = (
    _s("count", "a*b", _R(2, 10), ("{name} buys {a} {containers} of {unit}. Each {container} holds {b} {unit}.",
                                  "{name} has {a} {containers} with {b} {unit} in each {container}."),
       ("{name} buys {a} {containers} of {b} {unit}, so {he} has {calc}.", "{name} has {calc}."), _HAVE,
       b=_R(3, 25), becomes="count"),
    _s("count", "a+b", _R(5, 91), ("{name} collects {a} {unit} on {d1} and {b} {unit} on {d2}.",
                                  "On {d1} {name} gets {a} {unit}, and on {d2} {he} gets {b} more."),
       ("{name} has {calc} after {d2}.", "Over the two days {he} gets {calc}."), _HAVE, b=_R(5, 91), becomes="count"),
    _s("count", "a*b", _R(2, 26), ("{name} makes {a} {unit} every day for {b} days.",
                                  "Each day for {b} days, {name} collects {a} {unit}."),
       ("In {b} days {he} makes {calc}.", "{name} collects {calc} in total."), _HAVE, b=_R(3, 15), becomes="count"),
    _s("count", "a*b", _R(4, 61), "{friend} has {a} {unit}. {name} has {times} as many {unit} as {friend}.",
       ("{name} has {calc}.", "So {name} has {calc}."), _HAVE, b=_R(2, 5), becomes="count"),
    _s("count", "a-b", _R(20, 121), "{friend} has {a} {unit}, and {name} has {b} fewer {unit} than {friend}.",
       ("{name} has {calc}.", "So {name} starts with {calc}."), _HAVE, b=_R(3, 60), becomes="count"),
    _s("count", "a*b", _R(3, 31), "{a} children each bring {b} {unit} to class, and {name} gathers all of them.",
       ("{name} gathers {calc}.", "The children bring {calc}."), "How many {unit} does {name} gather?",
       b=_R(2, 13), becomes="count"),
    _s("money", "a*b", _R(8, 41), ("{name} earns ${a} per hour and works {b} hours this week.",
                                  "{name} works {b} hours at a pay of ${a} an hour."),
       ("{name} earns {calc}.", "For {b} hours {he} is paid {calc}."), "How much money does {name} earn?",
       b=_R(3, 41), becomes="money"),
    _s("money", "a*b", _R(5, 31), ("{name} saves ${a} every week for {b} weeks.",
                                  "{name} puts away ${a} a week for {b} weeks."),
       ("After {b} weeks {he} has {calc}.", "{name} saves {calc}."), "How much money does {name} save?",
       b=_R(3, 13), becomes="money"),
    _s("money", "a*b", _R(3, 41), "{name} sells {a} {items} at a yard sale for ${b} each.",
       ("{name} makes {calc} from the sale.", "The {items} bring in {calc}."), "How much money does {name} make?",
       b=_R(2, 26), becomes="money"),
    _s("cost", "a*b", _R(2, 13), ("{name} buys {a} {items} that cost ${b} each.",
                                  "{name} orders {a} {items} at ${b} apiece."),
       ("The {items} cost {calc}.", "{name} spends {calc} on {items}."), "How much does {name} spend?",
       b=_R(3, 61), becomes="cost"),
    _s("cost", "a*b", _R(2, 10), "Tickets to the {event} cost ${b} each, and {name} buys tickets for {a} people.",
       ("The tickets cost {calc}.", "{name} pays {calc} for the tickets."), "How much does {name} pay?",
       b=_R(4, 46), becomes="cost"),
    _s("distance", "a*b", _R(20, 71), "{name} drives at {a} {unit} per hour for {b} hours.",
       ("{name} drives {calc}.", "In {b} hours {he} covers {calc}."), "How far does {name} drive?",
       b=_R(2, 9), becomes="distance", units=("miles", "kilometers")),
    _s("distance", "a*b", _R(2, 10), "{name} walks {a} {unit} every day for {b} days.",
       ("{name} walks {calc}.", "Over {b} days {he} walks {calc}."), "How far does {name} walk?",
       b=_R(3, 15), becomes="distance", units=("miles", "kilometers")),
    _s("track", "a*b", _R(3, 21), "{name} runs {a} laps around a track that is {b} meters long.",
       ("{name} runs {calc}.", "The laps add up to {calc}."), "How many meters does {name} run?",
       b=_R(200, 501, 50), becomes="track", units="meters"),
    _s("minutes", "a*b", _R(5, 46), "{name} spends {a} minutes on each of {b} {tasks}.",
       ("The {tasks} take {calc}.", "{name} spends {calc}."), "How many minutes does {name} spend?",
       b=_R(2, 13), becomes="minutes", units="minutes"),
    _s("minutes", "a*b", _R(15, 91, 5), "{name} practices {what} for {a} minutes a day for {b} days.",
       ("{name} practices for {calc}.", "Over {b} days that is {calc}."), "How many minutes does {name} practice?",
       b=_R(3, 15), becomes="minutes", units="minutes"),
)

_LEFT = "How many {unit} does {name} have left?"
_MONEY_LEFT = "How much money does {name} have left?"
_OPS = (
    _s("count", "+", _R(2, 31), ("Then {friend} gives {him} {k} more {unit}.", "Later {he} finds {k} more {unit}.",
                                "The next day {he} gets another {k} {unit}."),
       ("Now {he} has {calc}.", "That makes {calc}."), "How many {unit} does {name} have now?"),
    _s("count", "-", _R(1, 31), ("{He} gives {k} {unit} to {friend}.", "On the way home {he} loses {k} of them.",
                                "{He} uses {k} {unit} for a school project."),
       ("{He} has {calc} left.", "So {name} is left with {calc}."), _LEFT),
    _s("count", "*", _R(2, 5), "By the end of the month {name} has {times} as many {unit} as that.",
       "At the end of the month {he} has {calc}.", "How many {unit} does {name} have at the end of the month?"),
    _s("count", "frac", _R(0), ("{He} gives {word} of {his} {unit} to {friend}.",
                               "{He} donates {word} of them to the school."),
       "{He} gives away {calc}.", "How many {unit} does {name} keep?",
       then="-", then_solves=("{He} keeps {calc}.", "That leaves {him} with {calc}.")),
    _s("count", "pct", _R(5, 80), ("{He} finds that {p}% of the {unit} are damaged and throws them away.",
                                  "{p}% of them turn out to be broken."),
       ("{He} throws away {calc}.", "The broken ones are {calc}."), _LEFT,
       then="-", then_solves=("{He} still has {calc}.", "So {calc} are left.")),
    _s("count", "frac", _R(0), "{He} keeps only {word} of them and gives the rest away.", "{He} keeps {calc}.",
       "How many {unit} does {name} keep?", terminal=True),
    _s("count", "/", _R(2, 10), "{He} shares them equally among {k} friends.", "Each friend gets {calc}.",
       "How many {unit} does each friend get?", terminal=True),
    _s("count", "/", _R(2, 10), "{He} puts them into {k} equal piles.", "Each pile has {calc}.",
       "How many {unit} are in each pile?", terminal=True),
    _s("count", "/", _R(2, 13), "{He} packs them into {containers} of {k}.",
       ("{He} fills {calc}.", "That fills {calc}."),
       "How many {containers} does {name} fill?", terminal=True, units="{containers}"),
    _s("count", "*", _R(2, 13), ("{He} sells each {item} for ${k}.", "{He} then sells all of them at ${k} each."),
       ("{He} earns {calc}.", "The sale brings in {calc}."), "How much money does {name} earn?", becomes="money"),
    _s("count", "+", _R(2, 41), "{friend} has {k} more {unit} than {name}.", "{friend} has {calc}.",
       "How many {unit} does {friend} have?", terminal=True),
    _s("money", "-", _R(1, 61), ("{He} spends ${k} on {thing}.", "{He} pays ${k} for {thing}."),
       ("{He} has {calc} left.", "That leaves {calc}."), _MONEY_LEFT),
    _s("money", "+", _R(5, 51), ("{He} also gets a ${k} bonus.", "{He} also gets ${k} in tips.",
                                "{His} aunt gives {him} ${k} as a gift."),
       ("{He} now has {calc}.", "Altogether {he} has {calc}."), "How much money does {name} have now?"),
    _s("money", "*", _R(2, 5), "By the end of the month {name} has {times} that much money.",
       "At the end of the month {he} has {calc}.", "How much money does {name} have at the end of the month?"),
    _s("money", "frac", _R(0), "{He} spends {word} of the money on {thing}.", "{He} spends {calc} on {thing}.",
       _MONEY_LEFT, then="-", then_solves=("{He} has {calc} left.", "That leaves {calc}.")),
    _s("money", "pct", _R(5, 80), "{He} donates {p}% of it to charity.", "{He} donates {calc}.",
       "How much money does {name} keep?", then="-", then_solves="{He} keeps {calc}."),
    _s("money", "frac", _R(0), "{He} puts {word} of it into a savings account.", "{He} saves {calc}.",
       "How much money does {name} save?", terminal=True),
    _s("money", "/", _R(2, 26), "{He} spends all of it on {items} that cost ${k} each.", "{He} buys {calc}.",
       "How many {items} does {name} buy?", terminal=True, units="{items}"),
    _s("money", "*", _R(2, 9), "{He} saves that much every week for {k} weeks.", "After {k} weeks {he} has {calc}.",
       "How much money does {name} have after {k} weeks?"),
    _s("cost", "a*b", _R(2, 7), "{He} also buys {a} {items} for ${b} each.", "The {items} cost {calc}.",
       "How much does {name} spend in total?", b=_R(2, 31), then="+",
       then_solves=("Altogether {he} spends {calc}.", "The total is {calc}.")),
    _s("cost", "+", _R(2, 21), ("There is also a ${k} delivery fee.", "There is also a ${k} service charge."),
       ("The total is {calc}.", "{He} pays {calc} in all."), "How much does {name} pay in total?"),
    _s("cost", "-", _R(1, 21), "{He} uses a coupon worth ${k}.",
       ("{He} pays {calc}.", "With the coupon that is {calc}."),
       "How much does {name} pay?"),
    _s("cost", "pct", _R(10, 80), ("The store gives {him} a {p}% discount.", "Everything is on sale for {p}% off."),
       "The discount is {calc}.", "How much does {name} pay after the discount?",
       then="-", then_solves="{He} pays {calc}."),
    _s("cost", "pct", _R(5, 21), "A {p}% sales tax is added to the bill.", "The tax is {calc}.",
       "How much does {name} pay in total?", then="+", then_solves="{He} pays {calc} in total."),
    _s("cost", "cash-", _R(0), "{He} pays with ${total} in cash.", "{He} gets {calc} in change.",
       "How much change does {name} get?", terminal=True),
    _s("cost", "/", _R(2, 7), "{name} splits the cost equally among {k} people.", "Each person pays {calc}.",
       "How much does each person pay?", terminal=True),
    _s("distance track", "+", _R(3, 61), "After a break, {he} goes another {k} {unit}.",
       "In total {he} covers {calc}.", "How many {unit} does {name} cover in total?"),
    _s("distance track", "*", _R(2, 3), ("Then {he} comes back the same way.", "{He} returns along the same route."),
       "There and back is {calc}.", "How many {unit} does {name} cover in total?"),
    _s("distance track minutes", "*", _R(2, 8), "{He} does the same thing every day for {k} days.",
       "Over {k} days that is {calc}.", "How many {unit} is that over the {k} days?"),
    _s("distance", "a*b", _R(20, 71), "Then {he} travels {b} more hours at {a} {unit} per hour.",
       "That part is {calc}.", "How many {unit} does {name} travel in total?", b=_R(1, 5), then="+",
       then_solves="Altogether {he} travels {calc}."),
    _s("distance track", "total-", _R(5, 121), "The whole route is {total} {unit} long.",
       "{He} still has {calc} to go.", "How many more {unit} does {name} have to go?", terminal=True),
    _s("minutes", "+", _R(5, 31, 5), "{He} also takes a {k}-minute break.", "With the break that is {calc}.",
       "How many minutes does {name} spend in total?"),
    _s("minutes", "a*b", _R(5, 31), "{He} also spends {a} minutes on each of {b} {tasks}.", "The {tasks} take {calc}.",
       "How many minutes does {name} spend in total?", b=_R(2, 9), then="+",
       then_solves="Altogether that is {calc}."),
    _s("minutes", "/", _R(60, 61), (), "That is {calc}.", "How many hours is that?", terminal=True, units="hours"),
)

_OPS_BY_KIND = {kind: [op for op in _OPS if kind in op.kinds.split()]
                for kind in ("count", "money", "cost", "distance", "track", "minutes")}


def arithmetic_problem(rng: random.Random) -> tuple[str, str, int]:
    """One problem drawn from ``rng``: (question, worked answer with one computation per line, final answer)."""
    story = _Story(rng)
    _apply(rng.choice(_STARTS), story)
    budget = rng.randint(MIN_STEPS, MAX_STEPS) - 1
    while budget > 0:
        options = [op for op in _OPS_BY_KIND[story.kind] if op.steps <= budget
                   and (op.steps == budget or not op.terminal)]
        rng.shuffle(options)
        options.sort(key=lambda op: op is story.last)  # stable: the previous operation goes last
        # every kind has an always-fitting one-step "+" operation, so some option applies
        budget -= next(op.steps for op in options if _apply(op, story))
    return " ".join(story.question + [story.ask]), "\n".join(story.steps), story.value


def arithmetic_problems(num_problems: int, seed: int) -> list[str]:
    """``num_problems`` rendered documents (see :func:`render_document`), the same for the same seed."""
    rng = random.Random(seed)
    return [render_document(*arithmetic_problem(rng)) for _ in range(num_problems)]
