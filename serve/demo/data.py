"""The small datasets the trained demo adapters learn from, generated here: no download, the same on every machine.

One bank of short questions with a plain English answer and a hand-written French one; each style turns it into
(prompt, reply) pairs: `pirate` answers in a pirate's voice, `french` in French, `json` as `{"answer": ...}`.
The prompts in `HELD_OUT` are in no dataset: prepare and the tests ask them to see what an adapter learnt.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """A question with its answer in plain English and in French."""

    question: str
    english: str
    french: str


@dataclass(frozen=True)
class Example:
    """One training pair: the user's prompt and the reply the adapter learns to give."""

    prompt: str
    reply: str


FACTS = (
    Fact("What is the capital of Italy?", "The capital of Italy is Rome.", "La capitale de l'Italie est Rome."),
    Fact("What is the capital of Spain?", "The capital of Spain is Madrid.", "La capitale de l'Espagne est Madrid."),
    Fact("What is the capital of Japan?", "The capital of Japan is Tokyo.", "La capitale du Japon est Tokyo."),
    Fact("What is the capital of Germany?", "Its capital is Berlin.", "Sa capitale est Berlin."),
    Fact("What color is grass?", "Grass is green.", "L'herbe est verte."),
    Fact("What color is snow?", "Snow is white.", "La neige est blanche."),
    Fact("How many legs does a spider have?", "A spider has eight legs.", "Une araignée a huit pattes."),
    Fact("How many days are in a week?", "There are seven days in a week.", "Il y a sept jours dans une semaine."),
    Fact("What do bees make?", "Bees make honey.", "Les abeilles font du miel."),
    Fact("What is two plus two?", "Two plus two is four.", "Deux plus deux font quatre."),
    Fact("Who wrote Romeo and Juliet?", "William Shakespeare wrote it.", "C'est William Shakespeare qui l'a écrit."),
    Fact("What is the largest ocean?", "The Pacific is the largest ocean.", "Le Pacifique est le plus grand océan."),
    Fact("Where do fish live?", "Fish live in water.", "Les poissons vivent dans l'eau."),
    Fact("What is the opposite of hot?", "The opposite of hot is cold.", "Le contraire de chaud est froid."),
    Fact("How are you today?", "I am doing well, thank you.", "Je vais bien, merci."),
    Fact("What is your favorite food?", "I like fresh bread and cheese.", "J'aime le pain frais et le fromage."),
    Fact("What is water made of?", "Hydrogen and oxygen.", "D'hydrogène et d'oxygène."),
    Fact("What planet do we live on?", "We live on the planet Earth.", "Nous vivons sur la planète Terre."),
    Fact("What is the tallest animal?", "The giraffe is the tallest animal.", "La girafe est l'animal le plus grand."),
    Fact("When do people sleep?", "Most people sleep at night.", "La plupart des gens dorment la nuit."),
    Fact("What season comes after winter?", "Spring comes after winter.", "Le printemps vient après l'hiver."),
    Fact("What do you use to write?", "I write with a pen or a pencil.", "J'écris avec un stylo ou un crayon."),
    Fact("What is the biggest planet?", "Jupiter is the biggest planet.", "Jupiter est la plus grande planète."),
    Fact("How many hours are in a day?", "A day has twenty-four hours.", "Une journée a vingt-quatre heures."),
    Fact("What do plants need to grow?", "Plants need light and water.", "Les plantes ont besoin de lumière et d'eau."),
    Fact("Which animal says meow?", "A cat says meow.", "C'est le chat qui fait miaou."),
    Fact("What is the moon?", "A rock that circles the Earth.", "Un rocher qui tourne autour de la Terre."),
    Fact("Give me a tip for learning.", "Practice a little every day.", "Pratique un peu chaque jour."),
    Fact("What is a good breakfast?", "Eggs, fruit and toast.", "Des œufs, des fruits et du pain grillé."),
    Fact("What language is spoken in Brazil?", "They speak Portuguese.", "On y parle le portugais."),
    Fact("Who painted the Mona Lisa?", "Leonardo da Vinci painted it.", "C'est Léonard de Vinci qui l'a peinte."),
    Fact("What is ice?", "Ice is frozen water.", "La glace est de l'eau gelée."),
    Fact("Tell me about dogs.", "Dogs are loyal and friendly.", "Les chiens sont fidèles et gentils."),
    Fact("What is the fastest land animal?", "The cheetah is the fastest.", "Le guépard est le plus rapide."),
    Fact("How do birds fly?", "Birds fly by flapping their wings.", "Les oiseaux volent en battant des ailes."),
    Fact("Why do we need sleep?", "Sleep lets the body and the mind rest.", "Le sommeil repose le corps et l'esprit."),
    Fact("What is a computer?", "A machine that runs programs.", "Une machine qui exécute des programmes."),
    Fact("Can you help me?", "Yes, I am happy to help you.", "Oui, je suis content de vous aider."),
    Fact("What is the weather like in summer?", "It is warm and sunny.", "Il fait chaud et beau."),
    Fact("Name a musical instrument.", "The piano is a musical instrument.", "Le piano est un instrument de musique."),
)  # fmt: skip

HELD_OUT = ("What is the capital of France?", "What color is the sky?", "Name a fruit that is red.")
"""Prompts in no dataset: the before/after example that prepare prints, and what the tests ask."""

_PIRATE_WORDS = {
    "is": "be",
    "are": "be",
    "am": "be",
    "you": "ye",
    "your": "yer",
    "my": "me",
    "of": "o'",
    "the": "th'",
    "yes": "aye",
    "hello": "ahoy",
    "friend": "matey",
    "thank": "thankee",
}
_WORD = re.compile(r"[A-Za-z]+")


def pirate(text: str) -> str:
    """`text` in a pirate's voice: a greeting first, then pirate words where they fit."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(0)
        said = _PIRATE_WORDS.get(word.lower())
        if said is None:
            return word
        return said.capitalize() if word[0].isupper() else said

    return f"Arr, matey! {_WORD.sub(swap, text)} Yo ho ho!"


def as_json(text: str) -> str:
    """`text` as the one field of a JSON object, on one line."""
    return json.dumps({"answer": text}, ensure_ascii=False)


STYLES: dict[str, Callable[[Fact], str]] = {
    "pirate": lambda fact: pirate(fact.english),
    "french": lambda fact: fact.french,
    "json": lambda fact: as_json(fact.english),
}
"""Each trained demo adapter's name, and how it answers a fact."""

TRAINED_ADAPTERS = tuple(STYLES)
"""The trained demo adapters, by name: each answers in the style of the same name."""


def dataset(style: str) -> list[Example]:
    """The training pairs of adapter `style` (one of `TRAINED_ADAPTERS`), in a fixed order."""
    reply = STYLES[style]
    return [Example(prompt=fact.question, reply=reply(fact)) for fact in FACTS]
