"""Small-talk user turns for the built-in dialogues: greetings, thanks and goodbyes, requests out
of scope, each many ways.

A turn is one core phrasing (a "body": "good morning", "thanks, that helped", "what is the weather
in Paris?") dressed in a surface form drawn from the intent's openers x closers x end punctuation x
casing ("Oh, good morning! :)", "ok, thanks, that helped. See ya.", "quick question: what is the
weather in Paris, please?"). The surface pieces are shared by every body of an intent and carry
no meaning, so a model learns the intent from the body; the split goes by body, so a held-out
turn's core phrasing is never seen in training, only its dressing is. Deterministic by seed.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SmallTalk:
    """One small-talk intent: its answer, core phrasings and the surface pieces around them."""

    answer: str
    bodies: tuple[str, ...]  # core phrasings, the unit of the train/val/test split
    openers: tuple[str, ...]  # said before a body ("" = none)
    closers: tuple[str, ...]  # said after it, before its end punctuation
    tails: tuple[str, ...]  # after the end punctuation: an emoticon or a short sentence


SMALL_TALK: dict[str, SmallTalk] = {
    "greeting": SmallTalk(
        "Hello! Ask me about a Python function or module.",
        ("hi", "hello", "hey", "hi there", "hello there", "hey there", "good morning",
         "good afternoon", "good evening", "greetings", "howdy", "hiya", "morning", "good day",
         "hey, anyone there?", "hi, nice to meet you", "hello, who are you?", "hi, how are you?",
         "hello, how is it going?", "hey, what's up?", "hi, what can you do?",
         "hello, is this the Python helper?", "hi bot", "hello assistant", "hey, I'm new here",
         "hi, can you help me?", "hello, is anybody there?", "hey, how are you doing?",
         "hi, I just got here", "hello again", "hi all", "good morning to you",
         "hey, nice to meet you", "hello, what do you do?", "hi, who am I talking to?",
         "hey hey", "yo", "hi, are you a bot?"),
        ("", "oh, ", "well, ", "um, ", "hey, ", "so, "),
        ("",),
        ("", " :)", " I have a question.", " Quick question.", " I need some help."),
    ),
    "goodbye": SmallTalk(
        "Goodbye! Happy coding.",
        ("bye", "goodbye", "see you later", "see you", "thanks, bye", "thank you",
         "thanks a lot", "thanks, that helped", "that is all, thank you", "ok thanks, goodbye",
         "bye for now", "cheers", "cheers, bye", "that's all I needed", "great, thanks",
         "much appreciated", "talk to you later", "have a nice day", "I'm done for today",
         "good night", "catch you later", "thanks for the help", "that answers my question",
         "thank you so much", "thanks, that's everything", "I think I'm done, bye",
         "thanks, you've been very helpful", "got it, thanks", "that's it for now",
         "nothing else, thanks", "take care", "bye bye", "I have to go now", "that solved it",
         "appreciate it", "later!"),
        ("", "ok, ", "great, ", "alright, ", "perfect, ", "awesome, ", "cool, "),
        ("",),
        ("", " :)", " Have a good one.", " You were great.", " See ya."),
    ),
    "out_of_scope": SmallTalk(
        "Sorry, I can only answer questions about the Python standard library.",
        ("what is the weather in Paris?", "tell me a joke", "who won the football game?",
         "can you book a table for two?", "what is the capital of Peru?", "sing me a song",
         "recommend a good movie", "how tall is Mount Everest?", "what should I cook tonight?",
         "what time is it in Tokyo?", "who is the president of France?", "write me a poem",
         "order me a pizza", "what's your favourite colour?", "play some music",
         "set an alarm for 7 am", "how many calories are in an apple?", "book me a flight to Rome",
         "remind me to call my mother", "what is the meaning of life?", "who wrote Hamlet?",
         "how do I bake bread?", "can you help me with my taxes?", "recommend a good book",
         "how far away is the moon?", "is it going to rain tomorrow?",
         "translate good night into Spanish", "how do I lose weight?", "how do I fix a flat tyre?",
         "what's the score of the match?", "turn on the lights", "what is the price of gold?",
         "how do I learn to swim?", "who painted the Mona Lisa?", "find me a cheap hotel",
         "what is a good name for a dog?", "how old is the universe?",
         "should I buy a new phone?", "call a taxi for me", "what's on TV tonight?",
         "how do I grow tomatoes?", "tell me a bedtime story", "what is the population of India?",
         "when does the supermarket close?", "give me some dating advice",
         "how do I get rid of a cold?"),
        ("", "hey, ", "quick question: ", "I was wondering, ", "random question: ",
         "different topic: ", "ok, "),
        ("", ", please", " please"),
        ("", " :)", " Thanks."),
    ),
}  # fmt: skip
_CASINGS = (str, lambda s: s[:1].upper() + s[1:], str.lower)


def _ends(body: str) -> tuple[str, ...]:
    """End punctuation that keeps a body's kind: a question stays a question."""
    return ("?", "??", " ?") if body.endswith("?") else ("", ".", "!")


def _form(opener: str, core: str, closer: str, end: str, tail: str) -> str:
    if not end and tail[1:2].isalpha():  # a sentence after it: end this one first
        end = "."
    return f"{opener}{core}{closer}{end}{tail}"


def surface_forms(intent: str, body: str, n: int, seed: int) -> list[str]:
    """`n` distinct surface forms of one body (fewer if the intent has fewer), chosen by seed."""
    talk = SMALL_TALK[intent]
    core = body.rstrip("?.!")
    pieces = itertools.product(talk.openers, talk.closers, _ends(body), talk.tails, _CASINGS)
    forms = sorted({case(_form(opener, core, closer, end, tail))
                    for opener, closer, end, tail, case in pieces})  # fmt: skip
    return random.Random(f"{seed}:{intent}:{body}").sample(forms, min(n, len(forms)))


def small_talk_turns(n: int, seed: int) -> Iterator[tuple[str, str, str, str]]:
    """(split key, intent, user turn, answer): `n` surface forms of every body; the key is the
    body, so all forms of one body land in one split."""
    for intent, talk in SMALL_TALK.items():
        for body in talk.bodies:
            for turn in surface_forms(intent, body, n, seed):
                yield f"{intent}:{body}", intent, turn, talk.answer
