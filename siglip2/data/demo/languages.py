"""The demo's words: captions and region captions in 9 languages, and the zero-shot prompts.

English plus de, es, fr, ru, zh, ja, ar, hi (Latin, Cyrillic, CJK, Arabic and Devanagari
scripts), mixed 90/10 English / other as in WebLI [P §2.1]. Each language is a small word
table with the few grammar rules it needs (gender, case, adjective order), so that a caption
names an object's size, colour and letter correctly inflected. :func:`describe`
writes a scene's caption from its objects and boxes (spatial relations from the boxes);
:func:`word_forms` lists every form a word takes, for tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .glyphs import LETTERS, WORDS

# Zero-shot prompts name the letter alone, in the caption frames English train captions use
# ("a photo of a letter K" is a train caption with size and colour left out).
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a letter {c}.",
    "a drawing of a letter {c}.",
    "a picture of a letter {c}.",
    "an image of a letter {c}.",
    "a letter {c}.",
)
# Zero-shot prompts for the words of the elongated images (glyphs.WORDS), in the same frames.
WORD_TEMPLATES: tuple[str, ...] = (
    "a photo of a word {c}.",
    "a drawing of a word {c}.",
    "a picture of a word {c}.",
    "an image of a word {c}.",
    "a word {c}.",
)
# The letters and words are their own names in every language (Latin capitals, as in real alt-text).
_LETTER_NAMES = {c: c for c in (*LETTERS, *WORDS)}

# An object is described by its (shape, color, size, category) names: the shape is the noun
# "letter", the category the letter itself; or, for a word of an elongated image, the noun
# "word" and the word, with no size ("" in the tuple: that adjective is left out in every
# language). Each language gives
#   np(o, case)  an indefinite noun phrase ("a large red letter K") in a grammatical case,
#   region(o)    the bare phrase used as a region caption ("large red letter K"),
#   rel[r]       templates "{a} ... {b}" for r in left/right/above/below, with rel_case[r]
#                the case {b} takes, also / join templates to add a third/fourth object,
#   prefixes     caption frames ("a photo of {}") so paraphrases exist for retrieval,
#   cats         the category words: the letter, written as itself after the noun in every
#                language, so it never inflects ("Buchstaben K", "буквой K").


class _Lang:
    code = ""
    rel: dict[str, tuple[str, ...]] = {}
    rel_case: dict[str, str] = {}
    also = "{x} and {y}"
    join = "{x} and {y}"
    prefixes: tuple[str, ...] = ("{}",)

    def np(self, o, case="nom") -> str:
        raise NotImplementedError

    def region(self, o) -> str:
        raise NotImplementedError

    def forms(self, name: str) -> tuple[str, ...]:
        """Every inflected form of a shape/colour/size word (for tests and debugging)."""
        raise NotImplementedError


class _En(_Lang):
    code = "en"
    rel = {
        "left": ("{a} left of {b}", "{a} to the left of {b}"),
        "right": ("{a} right of {b}", "{a} to the right of {b}"),
        "above": ("{a} above {b}",),
        "below": ("{a} below {b}", "{a} under {b}"),
    }
    rel_case = dict.fromkeys(rel, "nom")
    also = "{x}, and {y}"
    join = "{x}, and {y}"
    prefixes = ("{}", "a photo of {}", "an image of {}", "a drawing of {}", "a picture of {}")

    def region(self, o):  # size, colour or the letter may be omitted ("a letter K", "a red letter")
        return " ".join(w for w in (o[2], o[1], o[0] or "letter", o[3]) if w)

    def np(self, o, case="nom"):
        phrase = self.region(o)
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase

    def forms(self, name):
        return (name,)


class _De(_Lang):
    code = "de"
    shapes = {"letter": ("Buchstabe", "m"), "word": ("Wort", "n")}
    dative = {"Buchstabe": "Buchstaben"}  # a weak noun
    adj = {
        "small": "klein",
        "medium": "mittelgroß",
        "large": "groß",
        "red": "rot",
        "green": "grün",
        "blue": "blau",
        "yellow": "gelb",
        "purple": "violett",
        "orange": "orangefarben",
        "white": "weiß",
        "black": "schwarz",
    }
    rel = {
        "left": ("{a} links von {b}",),
        "right": ("{a} rechts von {b}",),
        "above": ("{a} über {b}",),
        "below": ("{a} unter {b}",),
    }
    rel_case = dict.fromkeys(rel, "dat")
    cats = _LETTER_NAMES
    also = join = "{x} und {y}"
    prefixes = ("{}", "Bild: {}", "Foto: {}", "Zeichnung: {}")

    def _phrase(self, o, case, article):
        noun, g = self.shapes[o[0]]
        if case == "dat":
            art, end = ("einer" if g == "f" else "einem"), "en"
        else:  # nominative; without an article the strong ending is the same here
            art, end = ("eine" if g == "f" else "ein"), {"m": "er", "n": "es", "f": "e"}[g]
        if case == "dat":
            noun = self.dative.get(noun, noun)
        words = " ".join([*(f"{self.adj[a]}{end}" for a in (o[2], o[1]) if a), noun, self.cats[o[3]]])
        return f"{art} {words}" if article else words

    def np(self, o, case="nom"):
        return self._phrase(o, case, True)

    def region(self, o):
        return self._phrase(o, "nom", False)

    def forms(self, name):
        if name in self.cats:
            return (self.cats[name],)
        return (self.shapes[name][0],) if name in self.shapes else (self.adj[name],)


class _Es(_Lang):
    code = "es"
    shapes = {"letter": ("letra", "f"), "word": ("palabra", "f")}
    adj = {
        "small": ("pequeño", "pequeña"),
        "medium": ("mediano", "mediana"),
        "large": ("grande", "grande"),
        "red": ("rojo", "roja"),
        "green": ("verde", "verde"),
        "blue": ("azul", "azul"),
        "yellow": ("amarillo", "amarilla"),
        "purple": ("morado", "morada"),
        "orange": ("naranja", "naranja"),
        "white": ("blanco", "blanca"),
        "black": ("negro", "negra"),
    }
    rel = {
        "left": ("{a} a la izquierda de {b}",),
        "right": ("{a} a la derecha de {b}",),
        "above": ("{a} encima de {b}",),
        "below": ("{a} debajo de {b}",),
    }
    rel_case = dict.fromkeys(rel, "nom")
    cats = _LETTER_NAMES
    also = join = "{x} y {y}"
    prefixes = ("{}", "una foto de {}", "una imagen de {}", "un dibujo de {}")

    def region(self, o):
        noun, g = self.shapes[o[0]]
        i = int(g == "f")
        return " ".join([noun, self.cats[o[3]], *(self.adj[a][i] for a in (o[1], o[2]) if a)])

    def np(self, o, case="nom"):
        return ("una " if self.shapes[o[0]][1] == "f" else "un ") + self.region(o)

    def forms(self, name):
        if name in self.cats:
            return (self.cats[name],)
        return (self.shapes[name][0],) if name in self.shapes else self.adj[name]


class _Fr(_Lang):
    code = "fr"
    shapes = {"letter": ("lettre", "f"), "word": ("mot", "m")}
    colors = {
        "red": ("rouge", "rouge"),
        "green": ("vert", "verte"),
        "blue": ("bleu", "bleue"),
        "yellow": ("jaune", "jaune"),
        "purple": ("violet", "violette"),
        "orange": ("orange", "orange"),
        "white": ("blanc", "blanche"),
        "black": ("noir", "noire"),
    }
    sizes = {
        "small": ("petit", "petite", True),
        "medium": ("moyen", "moyenne", False),
        "large": ("grand", "grande", True),
    }  # True: the adjective goes before the noun
    # "d'" + "un ..." gives "d'un ...": every {b} starts with un/une.
    rel = {
        "left": ("{a} à gauche d'{b}",),
        "right": ("{a} à droite d'{b}",),
        "above": ("{a} au-dessus d'{b}",),
        "below": ("{a} au-dessous d'{b}",),
    }
    rel_case = dict.fromkeys(rel, "nom")
    cats = _LETTER_NAMES
    also = join = "{x} et {y}"
    prefixes = ("{}", "une photo d'{}", "une image d'{}", "un dessin d'{}")

    def region(self, o):
        noun, g = self.shapes[o[0]]
        i = int(g == "f")
        m, f, before = self.sizes[o[2]] if o[2] else ("", "", False)
        size = (m, f)[i]
        color = self.colors[o[1]][i]
        letter = self.cats[o[3]]
        return f"{size} {noun} {letter} {color}" if before else " ".join(w for w in (noun, letter, color, size) if w)

    def np(self, o, case="nom"):
        return ("une " if self.shapes[o[0]][1] == "f" else "un ") + self.region(o)

    def forms(self, name):
        if name in self.cats:
            return (self.cats[name],)
        if name in self.shapes:
            return (self.shapes[name][0],)
        return self.colors.get(name) or self.sizes[name][:2]


class _Ru(_Lang):
    code = "ru"
    # nominative, genitive, instrumental, gender
    shapes = {"letter": ("буква", "буквы", "буквой", "f"), "word": ("слово", "слова", "словом", "n")}
    # nom m, nom f, nom n, gen m/n, gen f, ins m/n, ins f
    adj = {
        "small": ("маленький", "маленькая", "маленькое", "маленького", "маленькой", "маленьким", "маленькой"),
        "medium": ("средний", "средняя", "среднее", "среднего", "средней", "средним", "средней"),
        "large": ("большой", "большая", "большое", "большого", "большой", "большим", "большой"),
        "red": ("красный", "красная", "красное", "красного", "красной", "красным", "красной"),
        "green": ("зелёный", "зелёная", "зелёное", "зелёного", "зелёной", "зелёным", "зелёной"),
        "blue": ("синий", "синяя", "синее", "синего", "синей", "синим", "синей"),
        "yellow": ("жёлтый", "жёлтая", "жёлтое", "жёлтого", "жёлтой", "жёлтым", "жёлтой"),
        "purple": ("фиолетовый", "фиолетовая", "фиолетовое", "фиолетового", "фиолетовой", "фиолетовым", "фиолетовой"),
        "orange": ("оранжевый", "оранжевая", "оранжевое", "оранжевого", "оранжевой", "оранжевым", "оранжевой"),
        "white": ("белый", "белая", "белое", "белого", "белой", "белым", "белой"),
        "black": ("чёрный", "чёрная", "чёрное", "чёрного", "чёрной", "чёрным", "чёрной"),
    }
    rel = {
        "left": ("{a} слева от {b}",),
        "right": ("{a} справа от {b}",),
        "above": ("{a} над {b}",),
        "below": ("{a} под {b}",),
    }
    rel_case = {"left": "gen", "right": "gen", "above": "ins", "below": "ins"}
    cats = _LETTER_NAMES
    also = join = "{x} и {y}"
    prefixes = ("{}", "на фото {}", "на картинке {}", "рисунок: {}")

    def np(self, o, case="nom"):
        nom, gen, ins, g = self.shapes[o[0]]
        if case == "gen":
            k, noun = (4 if g == "f" else 3), gen
        elif case == "ins":
            k, noun = (6 if g == "f" else 5), ins
        else:
            k, noun = {"m": 0, "f": 1, "n": 2}[g], nom
        return " ".join([*(self.adj[a][k] for a in (o[2], o[1]) if a), noun, self.cats[o[3]]])

    def region(self, o):
        return self.np(o, "nom")

    def forms(self, name):
        if name in self.cats:
            return (self.cats[name],)
        return self.shapes[name][:3] if name in self.shapes else self.adj[name]


class _Zh(_Lang):
    code = "zh"
    shapes = {"letter": "字母", "word": "单词"}
    colors = {
        "red": "红色",
        "green": "绿色",
        "blue": "蓝色",
        "yellow": "黄色",
        "purple": "紫色",
        "orange": "橙色",
        "white": "白色",
        "black": "黑色",
    }
    sizes = {"small": "小", "medium": "中等大小", "large": "大"}
    cats = _LETTER_NAMES
    rel = {
        "left": ("{a}在{b}的左边", "{a}在{b}的左侧"),
        "right": ("{a}在{b}的右边", "{a}在{b}的右侧"),
        "above": ("{a}在{b}的上面", "{a}在{b}的上方"),
        "below": ("{a}在{b}的下面", "{a}在{b}的下方"),
    }
    rel_case = dict.fromkeys(rel, "nom")
    also = "{x}，还有{y}"
    join = "{x}，{y}"
    prefixes = ("{}", "图中，{}", "照片里，{}", "一张图片：{}")

    def region(self, o):
        size = f"{self.sizes[o[2]]}的" if o[2] else ""
        return f"{size}{self.colors[o[1]]}{self.shapes[o[0]]}{self.cats[o[3]]}"

    def np(self, o, case="nom"):
        return "一个" + self.region(o)

    def forms(self, name):
        return ((self.shapes | self.colors | self.sizes | self.cats)[name],)


class _Ja(_Lang):
    code = "ja"
    shapes = {"letter": "文字", "word": "単語"}
    colors = {
        "red": "赤い",
        "green": "緑の",
        "blue": "青い",
        "yellow": "黄色い",
        "purple": "紫の",
        "orange": "オレンジ色の",
        "white": "白い",
        "black": "黒い",
    }
    sizes = {"small": "小さい", "medium": "中くらいの", "large": "大きい"}
    cats = _LETTER_NAMES
    # "the A that is to the left of B": a noun phrase, like the English captions.
    rel = {
        "left": ("{b}の左にある{a}",),
        "right": ("{b}の右にある{a}",),
        "above": ("{b}の上にある{a}",),
        "below": ("{b}の下にある{a}",),
    }
    rel_case = dict.fromkeys(rel, "nom")
    also = join = "{x}と{y}"
    prefixes = ("{}", "{}の写真", "{}の絵", "{}の画像")

    def region(self, o):
        return f"{self.sizes.get(o[2], '')}{self.colors[o[1]]}{self.shapes[o[0]]}{self.cats[o[3]]}"

    def np(self, o, case="nom"):
        return self.region(o)

    def forms(self, name):
        return ((self.shapes | self.colors | self.sizes | self.cats)[name],)


class _Ar(_Lang):
    code = "ar"
    shapes = {"letter": ("حرف", "m"), "word": ("كلمة", "f")}
    adj = {
        "small": ("صغير", "صغيرة"),
        "medium": ("متوسط", "متوسطة"),
        "large": ("كبير", "كبيرة"),
        "red": ("أحمر", "حمراء"),
        "green": ("أخضر", "خضراء"),
        "blue": ("أزرق", "زرقاء"),
        "yellow": ("أصفر", "صفراء"),
        "purple": ("بنفسجي", "بنفسجية"),
        "orange": ("برتقالي", "برتقالية"),
        "white": ("أبيض", "بيضاء"),
        "black": ("أسود", "سوداء"),
    }
    rel = {
        "left": ("{a} على يسار {b}",),
        "right": ("{a} على يمين {b}",),
        "above": ("{a} فوق {b}",),
        "below": ("{a} تحت {b}",),
    }
    rel_case = dict.fromkeys(rel, "nom")
    cats = _LETTER_NAMES
    also = join = "{x} و{y}"  # "and" is written joined to the next word
    prefixes = ("{}", "صورة {}", "رسم {}", "صورة فيها {}")

    def region(self, o):
        noun, g = self.shapes[o[0]]
        i = int(g == "f")
        return " ".join([noun, self.cats[o[3]], *(self.adj[a][i] for a in (o[1], o[2]) if a)])

    def np(self, o, case="nom"):
        return self.region(o)

    def forms(self, name):
        if name in self.cats:
            return (self.cats[name],)
        return (self.shapes[name][0],) if name in self.shapes else self.adj[name]


class _Hi(_Lang):
    code = "hi"
    # direct, oblique (all masculine here)
    shapes = {"letter": ("अक्षर", "अक्षर"), "word": ("शब्द", "शब्द")}
    adj = {
        "small": ("छोटा", "छोटे"),
        "medium": ("मध्यम", "मध्यम"),
        "large": ("बड़ा", "बड़े"),
        "red": ("लाल", "लाल"),
        "green": ("हरा", "हरे"),
        "blue": ("नीला", "नीले"),
        "yellow": ("पीला", "पीले"),
        "purple": ("बैंगनी", "बैंगनी"),
        "orange": ("नारंगी", "नारंगी"),
        "white": ("सफ़ेद", "सफ़ेद"),
        "black": ("काला", "काले"),
    }
    cats = {c: (c, c) for c in _LETTER_NAMES}  # (direct, oblique): a letter or word does not inflect
    rel = {
        "left": ("{a} {b} के बाईं ओर है",),
        "right": ("{a} {b} के दाईं ओर है",),
        "above": ("{a} {b} के ऊपर है",),
        "below": ("{a} {b} के नीचे है",),
    }
    rel_case = dict.fromkeys(rel, "obl")
    also = "{x} और {y} भी है"
    join = "{x} और {y}"
    prefixes = ("{}", "तस्वीर में {}", "चित्र में {}")

    def np(self, o, case="nom"):
        i = int(case == "obl")
        return " ".join(["एक", *(self.adj[a][i] for a in (o[2], o[1]) if a), self.shapes[o[0]][i], self.cats[o[3]][i]])

    def region(self, o):
        return self.np(o)[len("एक ") :]

    def forms(self, name):
        return (self.shapes | self.cats).get(name) or self.adj[name]


LANGS: dict[str, _Lang] = {c.code: c() for c in (_En, _De, _Es, _Fr, _Ru, _Zh, _Ja, _Ar, _Hi)}
_OTHER_LANGS = tuple(k for k in LANGS if k != "en")
_EN_FRACTION = 0.9  # WebLI's mix [P §2.1]


def word_forms(lang: str, name: str) -> tuple[str, ...]:
    """All forms in which ``lang`` writes a category, shape, colour or size name (e.g. ru: буква/буквы/буквой)."""
    return LANGS[lang].forms(name)


def _relation(a_box, b_box) -> str:
    """Where a lies relative to b, along the axis where their centres differ most."""
    dx = (a_box[0] + a_box[2]) - (b_box[0] + b_box[2])
    dy = (a_box[1] + a_box[3]) - (b_box[1] + b_box[3])
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


OMITTABLE = ("size", "color", "category", "shape")


def describe(
    objects: Sequence[tuple[str, str, str, str]],
    boxes: Sequence[Sequence[float]],
    lang: str,
    rng: np.random.Generator,
    omit: Sequence[bool] = (False, False, False, False),
) -> str:
    """A caption naming every object (shape, colour, size, category) and how pairs are placed.

    Objects are ``(shape, color, size, category)`` tuples, described in a random order, so the
    same scene yields paraphrases (A left of B == B right of A); that is what gives retrieval
    several captions per image. ``omit`` flags, in ``OMITTABLE`` order (size, colour,
    category, shape), leave those words out for every object (the noun stays "letter");
    English only, since the other languages' inflection tables assume every word,
    as real alt-text often does.
    """
    L = LANGS[lang]
    if any(omit):
        if lang != "en":
            raise ValueError("omitting words is implemented for English captions only")
        o_size, o_color, o_cat, o_shape = omit
        objects = [
            ("" if o_shape else s, "" if o_color else c, "" if o_size else z, "" if o_cat else k)
            for s, c, z, k in objects
        ]
    order = rng.permutation(len(objects))
    obj = [objects[i] for i in order]
    box = [boxes[i] for i in order]

    def rel(i, j):
        r = _relation(box[i], box[j])
        t = L.rel[r][rng.integers(len(L.rel[r]))]
        return t.format(a=L.np(obj[i], "nom"), b=L.np(obj[j], L.rel_case[r]))

    n = len(obj)
    if n == 1:
        text = L.np(obj[0])
    elif n == 2:
        text = rel(0, 1)
    elif n == 3:
        text = L.also.format(x=rel(0, 1), y=L.np(obj[2]))
    else:
        text = L.join.format(x=rel(0, 1), y=rel(2, 3))
    return L.prefixes[rng.integers(len(L.prefixes))].format(text)
