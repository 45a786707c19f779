"""Everyday English sentences and short conversations from a seeded grammar (templates with word lists).

    rng, used = random.Random(0), set()
    dialogue(rng, 4, used)   # ["Hello, Anna.", "Hello, Tom! How are you today?", "How was your trip to Rome?", ...]
    heldout(200, seed=0)     # sentences for evaluation, from the same grammar with a seed of their own

Topics are time, weather, food, travel, work, family and errands; a conversation may open with greetings, then
goes on with question/answer pairs, requests and their replies, and single statements. Every sentence has 3 to 16
words, numbers are written as words, and every word is in the CMU pronouncing dictionary (`vocabulary()`).
"""

from __future__ import annotations

import random
import re

_SLOTS: dict[str, tuple[str, ...]] = {
    "name": ("Anna", "Tom", "Sarah", "David", "Emma", "James", "Lucy", "Peter", "Maria", "Daniel", "Kate", "Michael",
             "Laura", "Sam", "Grace", "Oliver", "Sophie", "Jack", "Olivia", "Ben", "Chloe", "Adam", "Nina", "Leo"),
    "relative": ("mother", "father", "sister", "brother", "aunt", "uncle", "cousin", "grandmother", "grandfather",
                 "son", "daughter", "nephew", "niece", "wife", "husband"),
    "city": ("London", "Paris", "Boston", "Chicago", "Dublin", "Madrid", "Berlin", "Rome", "Tokyo", "Seattle",
             "Denver", "Toronto", "Sydney", "Vienna", "Oslo", "Lisbon", "Prague", "Amsterdam", "Miami", "Glasgow"),
    "place": ("the station", "the airport", "the office", "the library", "the market", "the park", "the museum",
              "the beach", "the hospital", "the bank", "the post office", "the bakery", "the cinema", "the hotel",
              "the supermarket", "the pharmacy", "the bus stop", "the gym"),
    "weekday": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "day": ("today", "tomorrow", "tonight", "this morning", "this afternoon", "this evening", "this weekend",
            "next week", "on Monday", "on Tuesday", "on Wednesday", "on Thursday", "on Friday", "on Saturday",
            "on Sunday", "next month"),
    "daypart": ("morning", "afternoon", "evening"),
    "hour": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "time": ("seven o'clock", "eight o'clock", "nine o'clock", "ten o'clock", "noon", "half past two",
             "half past six", "quarter past nine", "quarter to five", "eleven thirty", "three fifteen",
             "four forty five", "six thirty", "one o'clock", "midnight", "eight fifteen", "five thirty",
             "quarter past twelve"),
    "minutes": ("five", "ten", "fifteen", "twenty", "twenty five", "thirty", "forty", "forty five"),
    "count": ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "price": ("two", "three", "four", "five", "six", "eight", "ten", "twelve", "fifteen", "twenty",
              "twenty five", "thirty", "forty", "fifty", "ninety nine", "one hundred"),
    "age": ("three", "five", "seven", "ten", "twelve", "sixteen", "eighteen", "twenty one", "thirty", "forty",
            "fifty", "sixty", "seventy five", "eighty", "ninety"),
    "ordinal": ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"),
    "temp": ("five", "ten", "twelve", "fifteen", "eighteen", "twenty", "twenty two", "twenty five", "thirty",
             "thirty two", "minus three", "zero"),
    "weather": ("sunny", "cloudy", "windy", "rainy", "cold", "warm", "hot", "foggy", "stormy", "freezing", "chilly",
                "humid", "dry", "wet", "snowy"),
    "vehicle": ("train", "bus", "plane", "ferry", "boat", "tram", "subway", "coach"),
    "transport": ("by train", "by bus", "by car", "by bike", "by taxi", "on foot", "by subway"),
    "food": ("soup", "pasta", "rice", "bread", "cheese", "chicken", "fish", "salad", "pizza", "cake", "apples",
             "eggs", "noodles", "potatoes", "sandwiches", "pancakes", "oranges", "carrots", "beans", "curry",
             "tomatoes", "cookies", "strawberries", "mushrooms"),
    "drink": ("tea", "coffee", "water", "orange juice", "milk", "lemonade", "hot chocolate", "apple juice"),
    "size": ("small", "large", "medium"),
    "meal": ("breakfast", "lunch", "dinner"),
    "taste": ("delicious", "a bit salty", "too cold", "really fresh", "very sweet", "quite spicy", "perfect",
              "wonderful", "a little dry"),
    "condiment": ("salt", "pepper", "butter", "bread", "sugar", "milk", "water", "olive oil"),
    "event": ("meeting", "party", "concert", "match", "dinner", "movie", "lesson", "class", "game", "interview",
              "appointment", "show"),
    "work_item": ("the report", "the presentation", "the budget", "the schedule", "the contract", "the slides",
                  "the invoice", "the proposal", "the summary", "the new design"),
    "task": ("finish the report", "call the client", "send the email", "book a meeting room", "check the numbers",
             "print the slides", "clean the kitchen", "buy some milk", "walk the dog", "water the plants",
             "pick up the kids", "pay the bills", "fix the printer", "take out the trash", "answer the phone",
             "order some lunch", "wash the dishes", "feed the cat"),
    "activity": ("play tennis", "go swimming", "watch a movie", "read a book", "go for a walk", "visit the museum",
                 "cook dinner", "ride our bikes", "go shopping", "play cards", "go to the beach", "bake a cake",
                 "work in the garden", "go fishing"),
    "feeling": ("happy", "tired", "busy", "hungry", "excited", "worried", "sleepy", "nervous", "glad", "bored",
                "fine", "great"),
    "health": ("doing well", "feeling much better", "very busy", "a little tired", "doing great", "still sick",
               "enjoying the new job", "getting older", "quite happy"),
    "mood": ("fine", "very well", "not bad", "great", "pretty good", "a little tired", "really busy", "wonderful"),
    "outcome": ("well", "badly", "fine", "better than expected", "really well", "okay", "quite well"),
    "subject": ("music", "history", "medicine", "law", "physics", "art", "biology", "chemistry", "economics",
                "computer science", "French", "design"),
    "job": ("a nurse", "a teacher", "an engineer", "a lawyer", "a doctor", "a pilot", "a chef", "a designer",
            "a student", "a writer", "a farmer", "an artist"),
    "sight": ("the old town", "the river", "a great museum", "the castle", "the harbour", "the cathedral",
              "the mountains", "the lake", "the markets"),
    "opinion": ("amazing", "lovely", "too short", "very relaxing", "a lot of fun", "really tiring", "great"),
    "item": ("an umbrella", "a jacket", "a scarf", "sunglasses", "a warm coat", "gloves", "a hat", "boots"),
    "thing": ("my keys", "my phone", "the tickets", "my wallet", "the map", "my glasses", "the charger",
              "my passport", "the remote"),
    "room": ("the kitchen", "the living room", "the car", "the bedroom", "the hall", "the garden", "my bag",
             "the office"),
    "shop_item": ("a loaf of bread", "some milk", "a dozen eggs", "some apples", "a bottle of water", "some cheese",
                  "a bag of rice", "some coffee", "a box of tea", "some flowers"),
    "ack": ("sure", "of course", "okay", "no problem", "alright", "yes", "absolutely", "certainly"),
    "thanks": ("thanks", "thank you", "thanks a lot", "thank you so much", "cheers"),
    "greet": ("hello", "hi", "hey", "good morning", "good afternoon", "good evening"),
    "lately": ("today", "these days", "this week", "this morning", "lately"),
    "past": ("last week", "yesterday", "last weekend", "last month", "last night"),
    "season": ("this summer", "this winter", "next month", "this year", "in the spring", "in the autumn",
               "next year"),
    "gift": ("present", "flowers", "book", "cake", "card", "sweater", "scarf", "watch"),
}

# A topic is a list of exchanges: one to three lines said by alternating speakers. Within an exchange a slot keeps
# its value ({food} twice is the same food); {food2} is a different food.
_TOPICS: dict[str, tuple[tuple[str, ...], ...]] = {
    "time": (
        ("What time does the {vehicle} to {city} leave?", "The {vehicle} leaves at {time} from platform {count}."),
        ("What time is the {event} {day}?", "It starts at {time} at {place}."),
        ("When should we meet {day}, {name}?", "How about {time} at {place}?"),
        ("Are you free {day} at {time}?", "{ack}, I have nothing planned until {time2}."),
        ("Sorry I am late, {name}, the {vehicle} was delayed.",
         "No problem, we started the {event} {minutes} minutes ago."),
        ("How long does it take to get to {place} {transport}?", "It takes about {minutes} minutes from {place2}."),
        ("Do you know what time {place} opens {day}?", "It opens at {time} and closes at {time2}."),
        ("Can we move the {event} to {weekday}?", "{weekday} works for me, see you at {time}."),
        ("Is the {event} still at {time}?", "No, {name} moved it to {time2} on {weekday}."),
        ("Please be at {place} by {time} {day}.", "{ack}, I will be there, {name}."),
        ("The {event} was moved to {time} {day}.",),
        ("I usually wake up at {time} on {weekday}.",),
        ("We have {minutes} minutes until the {event} starts.",),
    ),
    "weather": (
        ("What is the weather like in {city} {day}?", "It will be {weather} with a high of {temp} degrees."),
        ("Do I need {item} {day}?", "Yes, it is going to be {weather} and {weather2}."),
        ("It is so {weather} in {city} today.", "I know, I hope it is {weather2} {day}."),
        ("Is it going to snow in {city} {day}?", "I do not think so, but it will be {weather} and {temp} degrees."),
        ("How was the weather in {city} {past}?", "It was {weather} most of the time, {name}."),
        ("Do not forget {item}, it is {weather} outside.", "{thanks}, {name}, I almost forgot."),
        ("Is it {weather} in {city} right now?", "It is {weather2} and about {temp} degrees."),
        ("The forecast says it will be {weather} {day}.",),
        ("We should {activity} if it is {weather} {day}.",),
        ("It was {temp} degrees in {city} {past}.",),
    ),
    "food": (
        ("Would you like some {food}, {name}?", "Yes please, I love {food} with {condiment}."),
        ("Would you like some {drink}, {name}?", "No {thanks}, I just had {meal} with my {relative}."),
        ("What should we cook for {meal} {day}, {name}?", "How about {food} and {food2}?"),
        ("Can I get a {size} {drink} and some {food}, please?", "{ack}, that will be {price} dollars."),
        ("How is your {food}, {name}?", "It is {taste}, but I prefer {food2}."),
        ("Do you want to get {meal} with me {day}, {name}?", "Sure, I can meet you at {place} at {time}."),
        ("Could you pass the {condiment}, please, {name}?", "{ack}, here you go, {name2}."),
        ("We are out of {food} and {food2}, can you buy some?", "{ack}, I will stop at {place} on the way home."),
        ("Is there any {drink} left, {name}?", "I think so, {name2}, and I will buy more {day}."),
        ("This {food} is {taste}.", "I agree, {name} made it {day}."),
        ("I made {food} for {meal} {day}.",),
        ("My {relative} cooks the best {food} in {city}.",),
        ("I am so hungry, {name}, let's have {meal} at {time}.",),
    ),
    "travel": (
        ("Where are you going on holiday {season}, {name}?", "We are flying to {city} to see {sight}."),
        ("How do I get to {place} from {place2}?", "Take the {vehicle} and get off at the {ordinal} stop."),
        ("Is this the {vehicle} to {city}?", "Yes, it leaves from platform {count} at {time}."),
        ("How was your trip to {city}, {name}?", "It was {opinion}, we saw {sight} and {sight2}."),
        ("Could you book a room in {city} for {count} nights?",
         "{ack}, I will book it {day} and send you the details."),
        ("Excuse me, {name}, is {place} far from here?",
         "No, it is about {minutes} minutes {transport} from {place2}."),
        ("Have you ever been to {city}, {name}?", "Yes, I went there with my {relative} {past} and saw {sight}."),
        ("{name}, did you remember to pack {thing}?", "Yes, {name2}, I put {thing} in {room}."),
        ("How much is a {vehicle} ticket to {city}?", "It costs {price} dollars, or {price2} for a return."),
        ("My {vehicle} to {city} leaves at {time}.",),
        ("Our flight to {city} was delayed by {count} hours.",),
        ("I would love to visit {city} and see {sight}.",),
    ),
    "work": (
        ("Did you finish {work_item} for the {event}?", "Almost, I will send it to you {day}, {name}."),
        ("Can you {task} before {time}?", "{ack}, I will do it right after the {event}."),
        ("How did the {event} with {name} go?", "It went {outcome}, and {name2} was very {feeling}."),
        ("Who is leading the {event} {day}?", "{name} is leading it, and {name2} is helping."),
        ("I have {count} meetings {day}.", "That is a lot, {name}, should I {task}?"),
        ("Please send me {work_item} by {weekday}, {name}.", "{ack}, I will send it {day}."),
        ("Can we talk about {work_item} {day}?", "Yes, I am free after {time}, {name}."),
        ("{name} is working from home {day}.",),
        ("The new office in {city} opens on {weekday}.",),
        ("I need to {task} {day}.",),
        ("{name} will present {work_item} at the {event}.",),
    ),
    "family": (
        ("How is your {relative} doing, {name}?", "My {relative} is {health}, thank you for asking."),
        ("Are you visiting your {relative} {day}?", "Yes, we are taking the {vehicle} to {city} to see them."),
        ("What is your {relative} doing these days, {name}?", "My {relative} is studying {subject} in {city}."),
        ("How old is your {relative} now, {name}?", "My {relative} just turned {age}."),
        ("What does your {relative} do in {city}?", "My {relative} works as {job} there."),
        ("My {relative} is coming to visit {day}.", "That is wonderful, {name}, how long will your {relative} stay?",
         "About {count} days, and then we go to {city}."),
        ("Did your {relative} like the {gift}?", "Yes, my {relative} was very {feeling}."),
        ("Is your {relative} still working as {job}?", "No, my {relative} retired {count} years ago."),
        ("My {relative} and I {activity} every {weekday}.",),
        ("I called my {relative} {day}.",),
        ("My {relative} lives in {city} with {count} cats.",),
    ),
    "errands": (
        ("Could you {task} {day}, please?", "{ack}, I can do that after {meal}, {name}."),
        ("Can you help me {task}, {name}?", "{ack}, give me {minutes} minutes to finish {work_item}."),
        ("Please remember to {task} {day}.", "{thanks}, {name}, I almost forgot."),
        ("Have you seen {thing}, {name}?", "I think I saw {thing} in {room} {past}."),
        ("I am going to {place} {day}, do you need anything?",
         "Yes, could you get me {shop_item} and {shop_item2}?"),
        ("Do you want to {activity} {day}?", "I would love to, but I have to {task} {day}."),
        ("Let's {activity} {day}.", "Good idea, I will ask {name} and {name2} too."),
        ("Where did you put {thing}, {name}?", "I left {thing} in {room} {past}."),
        ("Can you pick up {shop_item} on your way home, {name}?", "{ack}, do you need anything else from {place}?",
         "Maybe {shop_item2} and some {food} too."),
        ("I have to {task} before {time}.",),
        ("{name} forgot {thing} at {place}.",),
    ),
}
_GREETINGS: tuple[tuple[str, ...], ...] = (
    ("{greet}, {name}.", "{greet}, {name2}! How are you {lately}?"),
    ("{greet}, {name}, how are you?", "I am {mood}, {thanks}, {name2}. And you?"),
    ("{greet}, {name}, it is nice to see you again.", "It is great to see you too, {name2}. How is your {relative}?"),
    ("Hey {name}, do you have {minutes} minutes {day}?", "{ack}, {name2}, what do you need?"),
    ("{greet}, {name}, how was your {weekday}?", "It was {opinion}, I went to {place} with my {relative}."),
    ("{greet}, {name}, how have you been?", "I have been {mood}, {thanks}, {name2}."),
)
_MIN_WORDS, _MAX_WORDS = 3, 16
_MAX_TRIES = 10_000
_SLOT = re.compile(r"\{([a-z_]+?)(\d?)\}")
_WORD = re.compile(r"[a-z']+")


def _fill(rng: random.Random, lines: tuple[str, ...]) -> list[str]:
    """The exchange's lines with their slots filled (the same slot keeps its value; {x2} differs from {x})."""
    values: dict[tuple[str, str], str] = {}

    def value(match: re.Match[str]) -> str:
        slot = match.group(1), match.group(2)
        if slot not in values:
            taken = {v for (name, _), v in values.items() if name == slot[0]}
            values[slot] = rng.choice([v for v in _SLOTS[slot[0]] if v not in taken])
        return values[slot]

    texts = [_SLOT.sub(value, line) for line in lines]
    return [text[0].upper() + text[1:] for text in texts]


def _new(rng: random.Random, exchanges: list[tuple[str, ...]], used: set[str]) -> list[str]:
    """The lines of a random exchange of `exchanges`, all of them new (not in `used`; added to it)."""
    for _ in range(_MAX_TRIES):
        texts = _fill(rng, rng.choice(exchanges))
        if (len(set(texts)) == len(texts) and used.isdisjoint(texts)
                and all(_MIN_WORDS <= len(t.split()) <= _MAX_WORDS for t in texts)):
            used.update(texts)
            return texts
    raise ValueError(f"the sentence grammar has no new sentences left after {len(used)}: ask for fewer")


def dialogue(rng: random.Random, turns: int, used: set[str]) -> list[str]:
    """`turns` new sentences (none in `used`; all added to it) of one conversation, each said by the speaker after
    the previous one's: sometimes greetings first, then exchanges on a topic that sometimes changes."""
    if turns < 1:
        raise ValueError(f"turns must be >= 1, got {turns}")
    lines: list[str] = []
    if turns >= 3 and rng.random() < 0.3:
        lines += _new(rng, list(_GREETINGS), used)
    topics = list(_TOPICS)
    topic = rng.choice(topics)
    while len(lines) < turns:
        if rng.random() < 0.2:
            topic = rng.choice(topics)
        lines += _new(rng, [e for e in _TOPICS[topic] if len(e) <= turns - len(lines)], used)
    return lines


def heldout(count: int, seed: int = 0) -> list[str]:
    """`count` distinct sentences of the same grammar for evaluation, deterministic in `seed` (their own random
    stream: a corpus excludes them from its training sentences)."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng, used, out = random.Random(f"heldout-{seed}"), set(), []
    while len(out) < count:
        out += dialogue(rng, rng.randint(1, 3), used)
    return out[:count]


def vocabulary() -> set[str]:
    """Every word the grammar can say, lowercased (letters and apostrophes)."""
    texts = [*_GREETINGS, *(e for exchanges in _TOPICS.values() for e in exchanges)]
    words = {w for lines in texts for line in lines for w in _WORD.findall(_SLOT.sub(" ", line).lower())}
    return words | {w for values in _SLOTS.values() for v in values for w in _WORD.findall(v.lower())}
