"""The embedded demo data: procedurally drawn objects with captions, boxes and masks.

Why it exists: every part of the recipe needs data that carries its signal, and the real
data (WebLI) is neither shippable nor small. A scene of 1-4 objects on a textured
background gives the sigmoid loss something learnable (category, colour, shape, size,
layout), LocCa its three targets (caption, region caption -> box, box -> region caption),
the dense probe a per-pixel class mask, NaFlex aspect ratios from 1:2 to 2:1, and the
tokenizer a 90/10 English / multilingual mix with non-Latin scripts, all from a seed, in
about a minute.

An object's *category* is its look: a fill pattern (striped, dotted, checkered, ...:
``CATEGORIES``) at a random period and angle, in the object's colour and the category's own
accent hue (``ACCENTS``; ``plain`` is one tone). The accent is what the tiny ViT learns: it
sees colour within a few thousand samples, but neither a silhouette (the shape) nor a
pattern in two tones of one colour within the demo's budget (``benchmarks/demo_probe.py``
measured each: see ``benchmarks/RESULTS.md``). Shape stays in the data and has its own
zero-shot set. English train captions leave out the size, colour, category or shape noun now
and then, as alt-text does, so prompts naming one attribute ("a photo of a striped shape.", "a photo of a star.")
are not out of distribution.

Layout (img2dataset keys: ``jpg`` image, ``txt`` caption, ``json`` metadata, ``seg.png``
class mask; ``0`` background, ``class_id + 1`` on each object, class = category)::

    root/train/{000000..0000NN}.tar
    root/eval/{zeroshot,zeroshot_shape,retrieval,refexp,segmentation}/{000000..000003}.tar + <name>.yaml
    root/tokenizer/demo_sp.model
    root/DONE.json        written last; holds the generation parameters and file sizes

``regions[i]`` and ``objects[i]`` describe the same drawn object; boxes are normalised pixel
edges ``[x1/W, y1/H, (x2+1)/W, (y2+1)/H]`` of the shape's tight mask bounding box.

Entry points: :func:`ensure_demo` (build once, atomically, under a file lock; reuse after)
and ``python -m siglip2.data.demo --out DIR``. :func:`render_grid` draws samples with their
boxes for a person to look at.
"""

from __future__ import annotations

import argparse
import colorsys
import fcntl
import io
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "CATEGORIES", "ACCENTS", "SHAPES", "COLORS", "SIZES", "LANGS", "ZEROSHOT_TEMPLATES", "SHAPE_TEMPLATES",
    "FORMAT_VERSION",
    "DemoData", "ensure_demo", "generate_sample", "render_grid", "word_forms", "describe",
]

# Bump when anything that changes the bytes of the output changes, so old caches rebuild.
FORMAT_VERSION = 3

# ----------------------------------------------------------------------------------------
# The world: categories (fill patterns), shapes, colours, sizes
# ----------------------------------------------------------------------------------------
# The category of an object is how it is filled: a pattern in its colour and the category's
# accent hue (ACCENTS below).
CATEGORIES: tuple[str, ...] = ("striped", "dotted", "checkered", "wavy", "ringed", "speckled", "plain", "gradient")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond", "heart")
# Saturated or extreme colours: backgrounds are muted mid-tones, so every object stands out.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "green": (35, 165, 60), "blue": (30, 70, 215), "yellow": (245, 215, 25),
    "purple": (135, 50, 175), "orange": (245, 130, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Object extent (longest side before rotation) as a fraction of the image's shorter side.
# The gaps between the ranges keep "small" / "medium" / "large" unambiguous to a model.
_SIZE_FRAC = {"small": (0.22, 0.28), "medium": (0.34, 0.41), "large": (0.48, 0.56)}
_MIN_EXTENT = 12  # px; below this a star is a blob
_MAX_ROT_DEG = 12.0  # small, so a rotated square never passes for a diamond
_MIN_COLOR_DIST = 100.0  # RGB distance between an object's colour and the background under it
_SHORT_SIDE = (64, 160)
_MAX_ASPECT = 2.0

# Pattern period as a fraction of the image's longer side (so the squashed 64 px training view
# keeps >= ~4 px per period).
_PERIOD_FRAC = (0.065, 0.10)
_MIN_PERIOD = 6.0  # px in the drawn image
# Each category's signature second tone (``plain`` has none). These hues are used for nothing
# else (no object colour, no background: those are muted), so seeing one in an object is
# seeing its category: a cue a tiny ViT learns as fast as colour. A pattern alone, in two
# tones of the object's colour, was not learned in the demo's budget (benchmarks/RESULTS.md).
ACCENTS: dict[str, tuple[int, int, int] | None] = {
    "striped": (255, 140, 200), "dotted": (0, 225, 235), "checkered": (180, 255, 0), "wavy": (110, 55, 15),
    "ringed": (0, 0, 110), "speckled": (255, 0, 255), "plain": None, "gradient": (130, 200, 255),
}
_MIN_ACCENT_DIST = 100.0  # an object's colour and its accent stay this far apart (RGB)

# Zero-shot prompts: categories are named with the noun "shape" (English train captions use it
# when they leave the shape out); the shape set names the shape alone.
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} shape.", "a drawing of a {c} shape.", "a picture of a {c} shape.",
    "an image of a {c} shape.", "a {c} shape.",
)
SHAPE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.", "a drawing of a {c}.", "a picture of a {c}.", "an image of a {c}.", "a {c}.",
)


def _unit_polygons() -> dict[str, np.ndarray]:
    """Each shape as a polygon centred at 0 with half-extent 1 (y down), drawn by PIL later.

    One polygon per shape (circles included) so that rotation, the image and the mask all go
    through the same rasteriser and stay pixel-identical.
    """
    def ring(n, r=1.0, start=0.0):
        a = start + np.arange(n) * 2 * np.pi / n
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)

    star = np.empty((10, 2))
    star[0::2] = ring(5, 1.0, -np.pi / 2)
    star[1::2] = ring(5, 0.45, -np.pi / 2 + np.pi / 5)
    w = 0.33
    cross = np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                      (-w, w), (-1, w), (-1, -w), (-w, -w)], float)
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    heart = np.stack([16 * np.sin(t) ** 3,
                      -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    polys = {
        "circle": ring(64),
        "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float),
        "triangle": np.array([(0, -1), (1, 0.732), (-1, 0.732)], float),
        "star": star,
        "hexagon": ring(6),
        "cross": cross,
        "diamond": np.array([(0, -1), (0.68, 0), (0, 1), (-0.68, 0)], float),
        "heart": heart,
    }
    out = {}
    for k, p in polys.items():  # centre the bounding box, scale the longest half-side to 1
        lo, hi = p.min(0), p.max(0)
        out[k] = (p - (lo + hi) / 2) / ((hi - lo).max() / 2)
    return out


_POLYS = _unit_polygons()

# ----------------------------------------------------------------------------------------
# Languages: small word tables and the few grammar rules each needs
# ----------------------------------------------------------------------------------------
# An object is described by its (shape, color, size, category) names. Each language gives
#   np(o, case)  an indefinite noun phrase ("a large red striped circle") in a grammatical case,
#   region(o)    the bare phrase used as a region caption ("large red striped circle"),
#   rel[r]       templates "{a} ... {b}" for r in left/right/above/below, with rel_case[r]
#                the case {b} takes, also / join templates to add a third/fourth object,
#   prefixes     caption frames ("a photo of {}") so paraphrases exist for retrieval,
#   cats         the category (fill pattern) words. Outside English, Chinese and Japanese
#                they are phrases that do not inflect ("mit Streifen", "в полоску"), so
#                no case or gender table needs a new column.


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
    rel = {"left": ("{a} left of {b}", "{a} to the left of {b}"),
           "right": ("{a} right of {b}", "{a} to the right of {b}"),
           "above": ("{a} above {b}",), "below": ("{a} below {b}", "{a} under {b}")}
    rel_case = dict.fromkeys(rel, "nom")
    also = "{x}, and {y}"
    join = "{x}, and {y}"
    prefixes = ("{}", "a photo of {}", "an image of {}", "a drawing of {}", "a picture of {}")

    def region(self, o):  # size, colour or category may be omitted; shape then reads "shape"
        return " ".join(w for w in (o[2], o[1], o[3], o[0] or "shape") if w)

    def np(self, o, case="nom"):
        phrase = self.region(o)
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase

    def forms(self, name):
        return (name,)


class _De(_Lang):
    code = "de"
    shapes = {"circle": ("Kreis", "m"), "square": ("Quadrat", "n"), "triangle": ("Dreieck", "n"),
              "star": ("Stern", "m"), "hexagon": ("Sechseck", "n"), "cross": ("Kreuz", "n"),
              "diamond": ("Raute", "f"), "heart": ("Herz", "n")}
    dative = {"Herz": "Herzen"}  # the one irregular noun here
    adj = {"small": "klein", "medium": "mittelgroß", "large": "groß", "red": "rot", "green": "grün",
           "blue": "blau", "yellow": "gelb", "purple": "violett", "orange": "orangefarben",
           "white": "weiß", "black": "schwarz"}
    rel = {"left": ("{a} links von {b}",), "right": ("{a} rechts von {b}",),
           "above": ("{a} über {b}",), "below": ("{a} unter {b}",)}
    rel_case = dict.fromkeys(rel, "dat")
    cats = {"striped": "mit Streifen", "dotted": "mit Punkten", "checkered": "mit Karos",
            "wavy": "mit Wellen", "ringed": "mit Ringen", "speckled": "mit Sprenkeln",
            "plain": "ohne Muster", "gradient": "mit Farbverlauf"}
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
        words = f"{self.adj[o[2]]}{end} {self.adj[o[1]]}{end} {noun} {self.cats[o[3]]}"
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
    shapes = {"circle": ("círculo", "m"), "square": ("cuadrado", "m"), "triangle": ("triángulo", "m"),
              "star": ("estrella", "f"), "hexagon": ("hexágono", "m"), "cross": ("cruz", "f"),
              "diamond": ("rombo", "m"), "heart": ("corazón", "m")}
    adj = {"small": ("pequeño", "pequeña"), "medium": ("mediano", "mediana"), "large": ("grande", "grande"),
           "red": ("rojo", "roja"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
           "yellow": ("amarillo", "amarilla"), "purple": ("morado", "morada"),
           "orange": ("naranja", "naranja"), "white": ("blanco", "blanca"), "black": ("negro", "negra")}
    rel = {"left": ("{a} a la izquierda de {b}",), "right": ("{a} a la derecha de {b}",),
           "above": ("{a} encima de {b}",), "below": ("{a} debajo de {b}",)}
    rel_case = dict.fromkeys(rel, "nom")
    cats = {"striped": "con rayas", "dotted": "con puntos", "checkered": "con cuadros", "wavy": "con ondas",
            "ringed": "con anillos", "speckled": "con motas", "plain": "sin dibujo", "gradient": "con degradado"}
    also = join = "{x} y {y}"
    prefixes = ("{}", "una foto de {}", "una imagen de {}", "un dibujo de {}")

    def region(self, o):
        noun, g = self.shapes[o[0]]
        i = int(g == "f")
        return f"{noun} {self.adj[o[1]][i]} {self.adj[o[2]][i]} {self.cats[o[3]]}"

    def np(self, o, case="nom"):
        return ("una " if self.shapes[o[0]][1] == "f" else "un ") + self.region(o)

    def forms(self, name):
        if name in self.cats:
            return (self.cats[name],)
        return (self.shapes[name][0],) if name in self.shapes else self.adj[name]


class _Fr(_Lang):
    code = "fr"
    shapes = {"circle": ("cercle", "m"), "square": ("carré", "m"), "triangle": ("triangle", "m"),
              "star": ("étoile", "f"), "hexagon": ("hexagone", "m"), "cross": ("croix", "f"),
              "diamond": ("losange", "m"), "heart": ("cœur", "m")}
    colors = {"red": ("rouge", "rouge"), "green": ("vert", "verte"), "blue": ("bleu", "bleue"),
              "yellow": ("jaune", "jaune"), "purple": ("violet", "violette"), "orange": ("orange", "orange"),
              "white": ("blanc", "blanche"), "black": ("noir", "noire")}
    sizes = {"small": ("petit", "petite", True), "medium": ("moyen", "moyenne", False),
             "large": ("grand", "grande", True)}  # True: the adjective goes before the noun
    # "d'" + "un ..." gives "d'un ...": every {b} starts with un/une.
    rel = {"left": ("{a} à gauche d'{b}",), "right": ("{a} à droite d'{b}",),
           "above": ("{a} au-dessus d'{b}",), "below": ("{a} au-dessous d'{b}",)}
    rel_case = dict.fromkeys(rel, "nom")
    cats = {"striped": "à rayures", "dotted": "à pois", "checkered": "à carreaux", "wavy": "à vagues",
            "ringed": "à anneaux", "speckled": "à mouchetures", "plain": "sans motif", "gradient": "en dégradé"}
    also = join = "{x} et {y}"
    prefixes = ("{}", "une photo d'{}", "une image d'{}", "un dessin d'{}")

    def region(self, o):
        noun, g = self.shapes[o[0]]
        i = int(g == "f")
        m, f, before = self.sizes[o[2]]
        size = (m, f)[i]
        color = self.colors[o[1]][i]
        pattern = self.cats[o[3]]
        return f"{size} {noun} {color} {pattern}" if before else f"{noun} {color} {size} {pattern}"

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
    shapes = {"circle": ("круг", "круга", "кругом", "m"), "square": ("квадрат", "квадрата", "квадратом", "m"),
              "triangle": ("треугольник", "треугольника", "треугольником", "m"),
              "star": ("звезда", "звезды", "звездой", "f"),
              "hexagon": ("шестиугольник", "шестиугольника", "шестиугольником", "m"),
              "cross": ("крест", "креста", "крестом", "m"), "diamond": ("ромб", "ромба", "ромбом", "m"),
              "heart": ("сердце", "сердца", "сердцем", "n")}
    # nom m, nom f, nom n, gen m/n, gen f, ins m/n, ins f
    adj = {
        "small": ("маленький", "маленькая", "маленькое", "маленького", "маленькой", "маленьким", "маленькой"),
        "medium": ("средний", "средняя", "среднее", "среднего", "средней", "средним", "средней"),
        "large": ("большой", "большая", "большое", "большого", "большой", "большим", "большой"),
        "red": ("красный", "красная", "красное", "красного", "красной", "красным", "красной"),
        "green": ("зелёный", "зелёная", "зелёное", "зелёного", "зелёной", "зелёным", "зелёной"),
        "blue": ("синий", "синяя", "синее", "синего", "синей", "синим", "синей"),
        "yellow": ("жёлтый", "жёлтая", "жёлтое", "жёлтого", "жёлтой", "жёлтым", "жёлтой"),
        "purple": ("фиолетовый", "фиолетовая", "фиолетовое", "фиолетового", "фиолетовой", "фиолетовым",
                   "фиолетовой"),
        "orange": ("оранжевый", "оранжевая", "оранжевое", "оранжевого", "оранжевой", "оранжевым", "оранжевой"),
        "white": ("белый", "белая", "белое", "белого", "белой", "белым", "белой"),
        "black": ("чёрный", "чёрная", "чёрное", "чёрного", "чёрной", "чёрным", "чёрной"),
    }
    rel = {"left": ("{a} слева от {b}",), "right": ("{a} справа от {b}",),
           "above": ("{a} над {b}",), "below": ("{a} под {b}",)}
    rel_case = {"left": "gen", "right": "gen", "above": "ins", "below": "ins"}
    cats = {"striped": "в полоску", "dotted": "в горошек", "checkered": "в клетку", "wavy": "с волнами",
            "ringed": "с кольцами", "speckled": "в крапинку", "plain": "без узора", "gradient": "с градиентом"}
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
        return f"{self.adj[o[2]][k]} {self.adj[o[1]][k]} {noun} {self.cats[o[3]]}"

    def region(self, o):
        return self.np(o, "nom")

    def forms(self, name):
        if name in self.cats:
            return (self.cats[name],)
        return self.shapes[name][:3] if name in self.shapes else self.adj[name]


class _Zh(_Lang):
    code = "zh"
    shapes = {"circle": "圆形", "square": "正方形", "triangle": "三角形", "star": "星形", "hexagon": "六边形",
              "cross": "十字形", "diamond": "菱形", "heart": "心形"}
    colors = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色",
              "orange": "橙色", "white": "白色", "black": "黑色"}
    sizes = {"small": "小", "medium": "中等大小", "large": "大"}
    cats = {"striped": "条纹", "dotted": "圆点", "checkered": "格子", "wavy": "波浪纹", "ringed": "环纹",
            "speckled": "斑点", "plain": "纯色", "gradient": "渐变"}
    rel = {"left": ("{a}在{b}的左边", "{a}在{b}的左侧"), "right": ("{a}在{b}的右边", "{a}在{b}的右侧"),
           "above": ("{a}在{b}的上面", "{a}在{b}的上方"), "below": ("{a}在{b}的下面", "{a}在{b}的下方")}
    rel_case = dict.fromkeys(rel, "nom")
    also = "{x}，还有{y}"
    join = "{x}，{y}"
    prefixes = ("{}", "图中，{}", "照片里，{}", "一张图片：{}")

    def region(self, o):
        return f"{self.sizes[o[2]]}的{self.colors[o[1]]}{self.cats[o[3]]}{self.shapes[o[0]]}"

    def np(self, o, case="nom"):
        return "一个" + self.region(o)

    def forms(self, name):
        return ((self.shapes | self.colors | self.sizes | self.cats)[name],)


class _Ja(_Lang):
    code = "ja"
    shapes = {"circle": "円", "square": "正方形", "triangle": "三角形", "star": "星", "hexagon": "六角形",
              "cross": "十字", "diamond": "ひし形", "heart": "ハート"}
    colors = {"red": "赤い", "green": "緑の", "blue": "青い", "yellow": "黄色い", "purple": "紫の",
              "orange": "オレンジ色の", "white": "白い", "black": "黒い"}
    sizes = {"small": "小さい", "medium": "中くらいの", "large": "大きい"}
    cats = {"striped": "縞模様の", "dotted": "水玉模様の", "checkered": "格子模様の", "wavy": "波模様の",
            "ringed": "輪模様の", "speckled": "まだら模様の", "plain": "無地の", "gradient": "グラデーションの"}
    # "the A that is to the left of B": a noun phrase, like the English captions.
    rel = {"left": ("{b}の左にある{a}",), "right": ("{b}の右にある{a}",),
           "above": ("{b}の上にある{a}",), "below": ("{b}の下にある{a}",)}
    rel_case = dict.fromkeys(rel, "nom")
    also = join = "{x}と{y}"
    prefixes = ("{}", "{}の写真", "{}の絵", "{}の画像")

    def region(self, o):
        return f"{self.sizes[o[2]]}{self.colors[o[1]]}{self.cats[o[3]]}{self.shapes[o[0]]}"

    def np(self, o, case="nom"):
        return self.region(o)

    def forms(self, name):
        return ((self.shapes | self.colors | self.sizes | self.cats)[name],)


class _Ar(_Lang):
    code = "ar"
    shapes = {"circle": ("دائرة", "f"), "square": ("مربع", "m"), "triangle": ("مثلث", "m"),
              "star": ("نجمة", "f"), "hexagon": ("شكل سداسي", "m"), "cross": ("صليب", "m"),
              "diamond": ("معين", "m"), "heart": ("قلب", "m")}
    adj = {"small": ("صغير", "صغيرة"), "medium": ("متوسط", "متوسطة"), "large": ("كبير", "كبيرة"),
           "red": ("أحمر", "حمراء"), "green": ("أخضر", "خضراء"), "blue": ("أزرق", "زرقاء"),
           "yellow": ("أصفر", "صفراء"), "purple": ("بنفسجي", "بنفسجية"), "orange": ("برتقالي", "برتقالية"),
           "white": ("أبيض", "بيضاء"), "black": ("أسود", "سوداء")}
    rel = {"left": ("{a} على يسار {b}",), "right": ("{a} على يمين {b}",),
           "above": ("{a} فوق {b}",), "below": ("{a} تحت {b}",)}
    rel_case = dict.fromkeys(rel, "nom")
    cats = {"striped": "بخطوط", "dotted": "بنقاط", "checkered": "بمربعات", "wavy": "بأمواج",
            "ringed": "بحلقات", "speckled": "ببقع", "plain": "بلا نقش", "gradient": "بتدرج لوني"}
    also = join = "{x} و{y}"  # "and" is written joined to the next word
    prefixes = ("{}", "صورة {}", "رسم {}", "صورة فيها {}")

    def region(self, o):
        noun, g = self.shapes[o[0]]
        i = int(g == "f")
        return f"{noun} {self.adj[o[1]][i]} {self.adj[o[2]][i]} {self.cats[o[3]]}"

    def np(self, o, case="nom"):
        return self.region(o)

    def forms(self, name):
        if name in self.cats:
            return (self.cats[name],)
        return (self.shapes[name][0],) if name in self.shapes else self.adj[name]


class _Hi(_Lang):
    code = "hi"
    # direct, oblique (all masculine here)
    shapes = {"circle": ("वृत्त", "वृत्त"), "square": ("वर्ग", "वर्ग"), "triangle": ("त्रिभुज", "त्रिभुज"),
              "star": ("तारा", "तारे"), "hexagon": ("षट्भुज", "षट्भुज"), "cross": ("क्रॉस", "क्रॉस"),
              "diamond": ("समचतुर्भुज", "समचतुर्भुज"), "heart": ("दिल", "दिल")}
    adj = {"small": ("छोटा", "छोटे"), "medium": ("मध्यम", "मध्यम"), "large": ("बड़ा", "बड़े"),
           "red": ("लाल", "लाल"), "green": ("हरा", "हरे"), "blue": ("नीला", "नीले"), "yellow": ("पीला", "पीले"),
           "purple": ("बैंगनी", "बैंगनी"), "orange": ("नारंगी", "नारंगी"), "white": ("सफ़ेद", "सफ़ेद"),
           "black": ("काला", "काले")}
    # "-दार" adjectives do not inflect; सादा does (direct, oblique)
    cats = {"striped": ("धारीदार", "धारीदार"), "dotted": ("बिंदीदार", "बिंदीदार"), "checkered": ("चेकदार", "चेकदार"),
            "wavy": ("लहरदार", "लहरदार"), "ringed": ("छल्लेदार", "छल्लेदार"), "speckled": ("चित्तीदार", "चित्तीदार"),
            "plain": ("सादा", "सादे"), "gradient": ("ढालदार", "ढालदार")}
    rel = {"left": ("{a} {b} के बाईं ओर है",), "right": ("{a} {b} के दाईं ओर है",),
           "above": ("{a} {b} के ऊपर है",), "below": ("{a} {b} के नीचे है",)}
    rel_case = dict.fromkeys(rel, "obl")
    also = "{x} और {y} भी है"
    join = "{x} और {y}"
    prefixes = ("{}", "तस्वीर में {}", "चित्र में {}")

    def np(self, o, case="nom"):
        i = int(case == "obl")
        return f"एक {self.adj[o[2]][i]} {self.adj[o[1]][i]} {self.cats[o[3]][i]} {self.shapes[o[0]][i]}"

    def region(self, o):
        return self.np(o)[len("एक "):]

    def forms(self, name):
        return (self.shapes | self.cats).get(name) or self.adj[name]


LANGS: dict[str, _Lang] = {c.code: c() for c in (_En, _De, _Es, _Fr, _Ru, _Zh, _Ja, _Ar, _Hi)}
_OTHER_LANGS = tuple(k for k in LANGS if k != "en")
_EN_FRACTION = 0.9  # WebLI's mix [P §2.1]


def word_forms(lang: str, name: str) -> tuple[str, ...]:
    """All forms in which ``lang`` writes a category, shape, colour or size name (e.g. ru: круг/круга/кругом)."""
    return LANGS[lang].forms(name)


def _relation(a_box, b_box) -> str:
    """Where a lies relative to b, along the axis where their centres differ most."""
    dx = (a_box[0] + a_box[2]) - (b_box[0] + b_box[2])
    dy = (a_box[1] + a_box[3]) - (b_box[1] + b_box[3])
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


OMITTABLE = ("size", "color", "category", "shape")


def describe(objects: Sequence[tuple[str, str, str, str]], boxes: Sequence[Sequence[float]], lang: str,
             rng: np.random.Generator, omit: Sequence[bool] = (False, False, False, False)) -> str:
    """A caption naming every object (shape, colour, size, category) and how pairs are placed.

    Objects are ``(shape, color, size, category)`` tuples, described in a random order, so the
    same scene yields paraphrases (A left of B == B right of A); that is what gives retrieval
    several captions per image. ``omit`` flags, in ``OMITTABLE`` order (size, colour,
    category, shape), leave those words out for every object (the shape noun becomes
    "shape"); English only, since the other languages' inflection tables assume every word,
    as real alt-text often does.
    """
    L = LANGS[lang]
    if any(omit):
        if lang != "en":
            raise ValueError("omitting words is implemented for English captions only")
        o_size, o_color, o_cat, o_shape = omit
        objects = [("" if o_shape else s, "" if o_color else c, "" if o_size else z, "" if o_cat else k)
                   for s, c, z, k in objects]
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


# ----------------------------------------------------------------------------------------
# Drawing one scene
# ----------------------------------------------------------------------------------------
def _muted(rng) -> np.ndarray:
    """A background colour of low saturation and middle value: every palette colour contrasts."""
    h, s, v = rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.38, 0.72)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


# Pixel noise is cut from one fixed bank: drawing fresh normals per image was a third of the time.
_NOISE = np.random.default_rng(20250221).standard_normal((384, 384, 1), dtype=np.float32) * np.float32(4.0)


def _background(rng, w: int, h: int) -> tuple[np.ndarray, str]:
    """Solid, gradient, blotchy texture or faint stripes, plus light pixel noise."""
    kind = ("solid", "gradient", "texture", "stripes")[rng.integers(4)]
    if kind == "solid":
        img = np.broadcast_to(_muted(rng).astype(np.float32), (h, w, 3))
    elif kind == "gradient":
        c1, c2 = _muted(rng).astype(np.float32), _muted(rng).astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        t = (np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(a))
             + np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(a)))
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c1 + (c2 - c1) * t[..., None]
    elif kind == "texture":
        gh, gw = rng.integers(3, 9, size=2)
        grid = np.clip(_muted(rng) + rng.normal(0, 22, size=(gh, gw, 3)), 0, 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
    else:
        c1 = _muted(rng).astype(np.float32)
        c2 = np.clip(c1 + rng.normal(0, 18, 3), 0, 255).astype(np.float32)
        a = rng.uniform(0, np.pi)
        period = rng.uniform(6, 20)
        t = (np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(a))
             + np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(a)))
        on = (np.sin(t * np.float32(2 * np.pi / period)) > 0)[..., None]
        img = np.where(on, c1, c2)
    oy, ox = rng.integers(0, _NOISE.shape[0] - h + 1), rng.integers(0, _NOISE.shape[1] - w + 1)
    img = img + _NOISE[oy:oy + h, ox:ox + w]
    return np.clip(img, 0, 255, out=img).astype(np.uint8), kind


def _image_size(rng) -> tuple[int, int]:
    """Short side 64..160 px, aspect log-uniform in [1:2, 2:1] (NaFlex needs the spread)."""
    s = int(rng.integers(_SHORT_SIDE[0], _SHORT_SIDE[1] + 1))
    ar = math.exp(rng.uniform(-math.log(_MAX_ASPECT), math.log(_MAX_ASPECT)))
    return (int(round(s * ar)), s) if ar >= 1 else (s, int(round(s / ar)))


@dataclass
class _Obj:
    shape: str
    color: str
    size: str
    category: str
    poly: np.ndarray  # (P, 2) pixel coordinates
    fill: tuple[int, int, int]
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # tight mask box, pixel edges x1 y1 x2 y2


_PALETTE = np.array(list(COLORS.values()), dtype=np.float64)


def _place(rng, w, h, n, force: dict[str, str], bg) -> list[_Obj]:
    """Rejection-sample n objects whose boxes stay 3 px apart, shrinking ones that do not fit.

    ``force`` fixes attributes of every object (``{"category": "dotted"}``: a balanced eval set)."""
    short = min(w, h)
    placed: list[_Obj] = []
    rects: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for attempt in range(40):
            shape = force.get("shape") or SHAPES[rng.integers(len(SHAPES))]
            category = force.get("category") or CATEGORIES[rng.integers(len(CATEGORIES))]
            size_i = int(rng.integers(3))
            if attempt >= 15:  # crowded image: fall back to smaller sizes before giving up
                size_i = min(size_i, 1 if attempt < 28 else 0)
            size = SIZES[size_i]
            extent = max(_MIN_EXTENT, rng.uniform(*_SIZE_FRAC[size]) * short)
            ang = math.radians(rng.uniform(-_MAX_ROT_DEG, _MAX_ROT_DEG))
            rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
            p = _POLYS[shape] @ rot.T * (extent / 2)
            lo, hi = p.min(0), p.max(0)
            if hi[0] - lo[0] > w - 6 or hi[1] - lo[1] > h - 6:
                continue
            cx = rng.uniform(2 - lo[0], w - 3 - hi[0])
            cy = rng.uniform(2 - lo[1], h - 3 - hi[1])
            r = (cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1])
            if any(r[0] < q[2] + 3 and q[0] < r[2] + 3 and r[1] < q[3] + 3 and q[1] < r[3] + 3 for q in rects):
                continue
            # colour: contrasting with the background under the object, and the description
            # unique in the image so that every region caption refers to exactly one object
            x0, y0 = int(max(r[0], 0)), int(max(r[1], 0))
            under = bg[y0:int(r[3]) + 1, x0:int(r[2]) + 1].reshape(-1, 3).mean(0)
            taken = {(o.shape, o.color, o.size, o.category) for o in placed}
            far = np.sqrt(((_PALETTE - under) ** 2).sum(1)) >= _MIN_COLOR_DIST
            accent = ACCENTS[category]
            ok = [c for c, f in zip(COLORS, far) if f and (shape, c, size, category) not in taken
                  and (accent is None or np.linalg.norm(np.subtract(COLORS[c], accent)) >= _MIN_ACCENT_DIST)]
            if not ok:
                continue
            color = ok[rng.integers(len(ok))]
            fill = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + rng.integers(-12, 13, 3), 0, 255))
            placed.append(_Obj(shape, color, size, category, p + (cx, cy), fill))
            rects.append(r)
            break
    return placed


def _pattern(category: str, x: np.ndarray, y: np.ndarray, period: float, rng) -> np.ndarray:
    """How much of the second tone each pixel takes, in [0, 1], for a fill pattern.

    ``x``, ``y``: pixel centres relative to the object's centre (px); ``period``: the pattern's
    repeat (px). Every pattern but ``plain`` puts about half its area in each tone."""
    a = rng.uniform(0, np.pi)
    u = x * np.cos(a) + y * np.sin(a)
    v = -x * np.sin(a) + y * np.cos(a)
    u0, v0 = rng.uniform(0, period, 2)  # phase
    if category == "striped":
        return ((u + u0) / period) % 1.0 < 0.5
    if category == "checkered":
        side = 0.6 * period
        return (np.floor((u + u0) / side) + np.floor((v + v0) / side)) % 2 == 1
    if category == "dotted":  # discs on a square lattice, 40% of the area
        du = (u + u0) % period - period / 2
        dv = (v + v0) % period - period / 2
        return du * du + dv * dv < 0.4 * period * period / np.pi
    if category == "wavy":  # stripes bent by a sine across them
        bend = 0.3 * period * np.sin(2 * np.pi * (v + v0) / (1.6 * period))
        return ((u + u0 + bend) / period) % 1.0 < 0.5
    if category == "ringed":  # concentric rings about a point near the centre, which is untinted
        cx, cy = rng.uniform(-0.15, 0.15, 2) * period
        return (np.hypot(x - cx, y - cy) / period) % 1.0 >= 0.5
    if category == "speckled":  # blotches: coarse noise, thresholded at its median
        cell = 0.35 * period
        gh = int(np.ceil((y.max() - y.min() + 1) / cell)) + 2
        gw = int(np.ceil((x.max() - x.min() + 1) / cell)) + 2
        grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
        field = np.asarray(grid.resize((int(gw * cell), int(gh * cell)), Image.BICUBIC), np.float32)
        iy = np.clip((y - y.min()).astype(int), 0, field.shape[0] - 1)
        ix = np.clip((x - x.min()).astype(int), 0, field.shape[1] - 1)
        f = field[iy, ix]
        return f > np.median(f)
    if category == "plain":
        return np.zeros_like(x, dtype=bool)
    if category == "gradient":  # the object's colour over a third, then a ramp to the other tone
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        t = t if rng.random() < 0.5 else 1.0 - t
        return np.clip((t - 0.35) / 0.65, 0.0, 1.0)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def _draw(w, h, bg, objs: list[_Obj], rng) -> tuple[Image.Image, np.ndarray]:
    """Image and class mask from the same rasterised silhouettes, then tight boxes from the mask.

    Each silhouette is filled with its category's pattern in its colour and its category's
    accent (``ACCENTS``); the pattern's period is a fraction of the image's longer side
    (``_PERIOD_FRAC``)."""
    ids = Image.new("L", (w, h), 0)
    dm = ImageDraw.Draw(ids)
    for i, o in enumerate(objs):
        dm.polygon([tuple(v) for v in o.poly.tolist()], fill=i + 1)
    idm = np.asarray(ids)
    img = bg.astype(np.float32)
    m = np.zeros((h, w), np.uint8)
    for i, o in enumerate(objs):
        # Boxes of different objects are >= 3 px apart, so a 1 px margin window sees only this one.
        lo, hi = o.poly.min(0), o.poly.max(0)
        x0, y0 = max(int(math.floor(lo[0])) - 1, 0), max(int(math.floor(lo[1])) - 1, 0)
        x1, y1 = min(int(math.ceil(hi[0])) + 2, w), min(int(math.ceil(hi[1])) + 2, h)
        ys, xs = np.nonzero(idm[y0:y1, x0:x1] == i + 1)
        o.box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        ys, xs = ys + y0, xs + x0
        centre = (lo + hi) / 2
        period = max(_MIN_PERIOD, rng.uniform(*_PERIOD_FRAC) * max(w, h))
        t = _pattern(o.category, xs + 0.5 - centre[0], ys + 0.5 - centre[1], period, rng)
        t = np.asarray(t, np.float32)[:, None]
        fill = np.asarray(o.fill, np.float32)
        accent = ACCENTS[o.category]
        second = fill if accent is None else np.asarray(accent, np.float32) + rng.integers(-12, 13, 3)
        img[ys, xs] = fill * (1 - t) + second * t
        m[ys, xs] = CATEGORIES.index(o.category) + 1
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8)), m


def generate_sample(rng: np.random.Generator, n_objects: int, force: dict[str, str] | None = None,
                    lang: str | None = None, n_captions: int = 1, omit_prob: float = 0.0) -> dict:
    """One scene: ``{"image": PIL, "mask": uint8 array, "captions": [...], "meta": json dict}``.

    ``force``: attributes every object takes (``{"category": "dotted"}`` or ``{"shape": "star"}``).
    ``omit_prob``: for English captions, the chance, drawn for each of size, colour, category
    and shape on its own, that those words are left out of a caption (the shape noun becomes
    "shape"). Region captions always keep every word, so that each names exactly one object.
    """
    force = dict(force or {})
    bad = {k: v for k, v in force.items()
           if v not in {"shape": SHAPES, "category": CATEGORIES}.get(k, ())}
    if bad:
        raise ValueError(f"force takes a known shape or category, got {bad}")
    if lang is None:
        lang = "en" if rng.random() < _EN_FRACTION else _OTHER_LANGS[rng.integers(len(_OTHER_LANGS))]
    while True:  # a crowded small image can fail to fit n objects: draw a new canvas
        w, h = _image_size(rng)
        bg, _ = _background(rng, w, h)
        objs = _place(rng, w, h, n_objects, force, bg)
        if len(objs) == n_objects:
            break
    img, mask = _draw(w, h, bg, objs, rng)
    L = LANGS[lang]
    triples = [(o.shape, o.color, o.size, o.category) for o in objs]
    boxes = [o.box for o in objs]
    captions: list[str] = []
    for _ in range(200):
        omit = (False,) * len(OMITTABLE)
        if omit_prob > 0 and lang == "en":
            omit = tuple(bool(rng.random() < omit_prob) for _ in OMITTABLE)
        c = describe(triples, boxes, lang, rng, omit)
        if c not in captions:
            captions.append(c)
        if len(captions) == n_captions:
            break
    meta = {
        "lang": lang, "width": w, "height": h,
        "regions": [{"caption": L.region(t),
                     "box": [round(b[0] / w, 6), round(b[1] / h, 6), round(b[2] / w, 6), round(b[3] / h, 6)]}
                    for t, b in zip(triples, boxes)],
        "objects": [{"category": k, "shape": s, "color": c, "size": z, "class_id": CATEGORIES.index(k)}
                    for s, c, z, k in triples],
    }
    return {"image": img, "mask": mask, "captions": captions, "meta": meta}


# ----------------------------------------------------------------------------------------
# Splits and shards
# ----------------------------------------------------------------------------------------
# sid: the split's seed stream, so eval sets never share random draws with train.
_SPLITS = {
    # English train captions sometimes leave words out (zero-shot prompts name one attribute).
    "train": dict(sid=0, n_objects=(1, 2, 3, 4), p=(0.3, 0.3, 0.2, 0.2), omit_prob=0.3),
    # single objects, balanced over the attribute named by `label` (category or shape)
    "zeroshot": dict(sid=1, n_objects=(1,), p=(1.0,), label="category"),
    "retrieval": dict(sid=2, n_objects=(1, 2, 3, 4), p=(0.25, 0.25, 0.25, 0.25), n_captions=3),
    "refexp": dict(sid=3, n_objects=(2, 3, 4), p=(0.4, 0.3, 0.3)),
    "segmentation": dict(sid=4, n_objects=(1, 2, 3, 4), p=(0.25, 0.25, 0.25, 0.25)),
    "zeroshot_shape": dict(sid=5, n_objects=(1,), p=(1.0,), label="shape"),
}
_EVAL_SPLITS = ("zeroshot", "zeroshot_shape", "retrieval", "refexp", "segmentation")
_LABELS = {"category": CATEGORIES, "shape": SHAPES}
_PER_SHARD = 1000
_MIN_SHARDS = 4  # so 2 ranks x 2 loader workers each get a shard of a small split
_JPEG_QUALITY = 90
_TAR_MTIME = 0  # fixed tar header time: same seed, same bytes


def _shard_plan(n: int) -> list[tuple[int, int]]:
    """(start, count) per shard: ~1000 per shard, at least 4 shards when there are 4 samples."""
    k = max(math.ceil(n / _PER_SHARD), min(_MIN_SHARDS, n), 1)
    base, extra = divmod(n, k)
    plan, start = [], 0
    for i in range(k):
        c = base + (i < extra)
        plan.append((start, c))
        start += c
    return plan


def _encode(sample: dict) -> dict:
    buf = io.BytesIO()
    # 4:4:4: chroma subsampling would blur the accent into the object's colour at fine periods
    sample["image"].save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0)
    mbuf = io.BytesIO()
    Image.fromarray(sample["mask"]).save(mbuf, format="PNG")
    return {"jpg": buf.getvalue(), "txt": sample["captions"][0].encode("utf-8"),
            "json": json.dumps(sample["meta"], ensure_ascii=False).encode("utf-8"), "seg.png": mbuf.getvalue()}


def _write_shard(task: tuple) -> tuple[str, int, list[str]]:
    """Write one shard from its own seed stream (seed, split, shard): worker count is irrelevant.

    Returns the texts the tokenizer is trained on (train split only).
    """
    from webdataset import TarWriter

    path, split, seed, shard, start, count = task
    cfg = _SPLITS[split]
    rng = np.random.default_rng([seed, cfg["sid"], shard])
    texts: list[str] = []
    with TarWriter(path, mtime=_TAR_MTIME) as tw:
        for i in range(start, start + count):
            n = int(rng.choice(cfg["n_objects"], p=cfg["p"]))
            force = {}
            if "label" in cfg:  # balanced classes
                names = _LABELS[cfg["label"]]
                force = {cfg["label"]: names[i % len(names)]}
            s = generate_sample(rng, n, force=force, n_captions=cfg.get("n_captions", 1),
                                omit_prob=cfg.get("omit_prob", 0.0))
            if "label" in cfg:
                s["meta"]["label"] = _LABELS[cfg["label"]].index(force[cfg["label"]])
            if split == "retrieval":
                s["meta"]["captions"] = s["captions"]
            tw.write({"__key__": f"{i:09d}", **_encode(s)})
            if split == "train":
                texts.extend(s["captions"])
                texts.extend(r["caption"] for r in s["meta"]["regions"])
    return split, shard, texts


def _lexicon(lang: str, rng: np.random.Generator) -> list[str]:
    """Every word form and frame of a language in a few hundred sentences.

    Why: a non-English language is ~1% of the captions, so its rarer forms (a Russian
    instrumental, a Japanese prefix) would otherwise be split into characters or bytes.
    """
    L = LANGS[lang]
    objs = [(s, c, z, CATEGORIES[(i + j) % len(CATEGORIES)])
            for i, s in enumerate(SHAPES) for j, c in enumerate(COLORS) for z in SIZES]
    rels = [(r, t) for r, ts in L.rel.items() for t in ts]
    out = []
    for i, o in enumerate(objs):
        o2 = objs[rng.integers(len(objs))]
        r, t = rels[i % len(rels)]
        clause = t.format(a=L.np(o), b=L.np(o2, L.rel_case[r]))
        if i % 3 == 1:
            clause = L.also.format(x=clause, y=L.np(o2))
        elif i % 3 == 2:
            clause = L.join.format(x=clause, y=clause)
        out.append(L.prefixes[i % len(L.prefixes)].format(clause).lower())
        out.append(L.region(o).lower())
    return out


def _tokenizer_corpus(texts: list[str], rng: np.random.Generator) -> list[str]:
    """Captions and region captions, lower-cased as the tokenizer will see them, plus numbers
    (LocCa writes boxes as integers through this tokenizer), the zero-shot prompts and each
    language's lexicon. Then every character the demo can write is topped up, as one-character
    lines (which add no merges), to 0.2% of all characters: SentencePiece keeps only the
    characters that make up 99.95% of the text, and the rest would fall to byte fallback."""
    out = [t.lower() for t in texts]
    out += [" ".join(str(v) for v in rng.integers(0, 1000, size=4)) for _ in range(2000)]
    out += [t.format(c=c) for t in ZEROSHOT_TEMPLATES for c in CATEGORIES]
    out += [t.format(c=c) for t in SHAPE_TEMPLATES for c in SHAPES]
    for lang in LANGS:
        out += _lexicon(lang, rng)
    alphabet = {c for lang in LANGS for t in _lexicon(lang, rng) for c in t} | set("0123456789")
    alphabet |= {c for t in ZEROSHOT_TEMPLATES + SHAPE_TEMPLATES for c in t.replace("{c}", "")}
    counts: dict[str, int] = {}
    for t in out:
        for c in t:
            counts[c] = counts.get(c, 0) + 1
    need = math.ceil(0.002 * sum(counts.values()))
    for c in sorted(alphabet - {" "}):
        out += [c] * max(0, need - counts.get(c, 0))
    return out


# ----------------------------------------------------------------------------------------
# Build once, atomically; reuse after
# ----------------------------------------------------------------------------------------
@dataclass
class DemoData:
    root: str
    train_urls: str  # brace pattern, absolute
    zeroshot_yaml: str  # categories
    zeroshot_shape_yaml: str
    retrieval_yaml: str
    refexp_yaml: str
    segmentation_yaml: str
    tokenizer_path: str
    num_train: int = 0
    classnames: list[str] = field(default_factory=lambda: list(CATEGORIES))
    built: bool = False  # True when this call generated the data (False: reused the cache)


def _brace(n: int) -> str:
    return f"{{000000..{n - 1:06d}}}.tar"


def _yaml_specs(counts: dict[str, int]) -> dict[str, dict]:
    n = {s: len(_shard_plan(counts[s])) for s in _EVAL_SPLITS}
    return {
        "zeroshot": {"name": "demo_zeroshot", "task": "zeroshot", "urls": _brace(n["zeroshot"]),
                     "num_samples": counts["zeroshot"], "classnames": list(CATEGORIES),
                     "templates": list(ZEROSHOT_TEMPLATES), "label_key": "label", "lang_key": "lang"},
        "zeroshot_shape": {"name": "demo_zeroshot_shape", "task": "zeroshot", "urls": _brace(n["zeroshot_shape"]),
                           "num_samples": counts["zeroshot_shape"], "classnames": list(SHAPES),
                           "templates": list(SHAPE_TEMPLATES), "label_key": "label", "lang_key": "lang"},
        "retrieval": {"name": "demo_retrieval", "task": "retrieval", "urls": _brace(n["retrieval"]),
                      "num_samples": counts["retrieval"], "captions_key": "captions", "lang_key": "lang"},
        "refexp": {"name": "demo_refexp", "task": "refexp", "urls": _brace(n["refexp"]),
                   "num_samples": counts["refexp"], "regions_key": "regions", "lang_key": "lang"},
        "segmentation": {"name": "demo_segmentation", "task": "segmentation",
                         "urls": _brace(n["segmentation"]), "num_samples": counts["segmentation"],
                         "classnames": list(CATEGORIES), "mask_key": "seg.png", "background_id": 0,
                         "num_classes": len(CATEGORIES) + 1, "lang_key": "lang"},
    }


def _build(out: str, params: dict, workers: int) -> None:
    """Generate everything into ``out`` (a fresh temp dir); DONE.json is written last."""
    import yaml

    from siglip2.data.tokenizer import train_sentencepiece

    seed = params["seed"]
    counts = {"train": params["num_train"], **params["eval_sizes"]}
    tasks = []
    for split, n in counts.items():
        d = os.path.join(out, "train") if split == "train" else os.path.join(out, "eval", split)
        os.makedirs(d, exist_ok=True)
        for shard, (start, c) in enumerate(_shard_plan(n)):
            tasks.append((os.path.join(d, f"{shard:06d}.tar"), split, seed, shard, start, c))
    tasks.sort(key=lambda t: -t[5])  # largest first: the pool finishes together
    if workers and workers > 1 and not mp.current_process().daemon:  # daemons may not have children
        # spawn, not fork: DDP ranks and DataLoaders hold threads that fork would copy mid-lock
        with mp.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_write_shard, tasks, chunksize=1)
    else:
        results = [_write_shard(t) for t in tasks]
    texts = [t for split, shard, ts in sorted(results, key=lambda r: (r[0], r[1])) for t in ts]
    corpus = _tokenizer_corpus(texts, np.random.default_rng([seed, 99]))
    tok = train_sentencepiece(corpus, os.path.join(out, "tokenizer", "demo_sp"), vocab_size=4000)
    if os.path.exists(tok[:-len(".model")] + ".vocab"):
        os.remove(tok[:-len(".model")] + ".vocab")  # a human-readable copy of the model; unused
    _strip_build_path(tok)
    for split, spec in _yaml_specs(counts).items():
        with open(os.path.join(out, "eval", split, f"{split}.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(spec, f, allow_unicode=True, sort_keys=False)
    files = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            p = os.path.join(dirpath, name)
            files[os.path.relpath(p, out)] = os.path.getsize(p)
    marker = {"format_version": FORMAT_VERSION, "params": params, "counts": counts,
              "train_shards": len(_shard_plan(counts["train"])), "files": dict(sorted(files.items()))}
    with open(os.path.join(out, "DONE.json.partial"), "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(out, "DONE.json.partial"), os.path.join(out, "DONE.json"))


def _strip_build_path(model_path: str) -> None:
    """SentencePiece records its output path (our temp dir) in the model: drop it, so the same
    seed gives the same bytes wherever and whenever it was built."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # protobuf missing: the model still works, it is just not byte-stable
        return
    m = pb.ModelProto()
    with open(model_path, "rb") as f:
        m.ParseFromString(f.read())
    m.trainer_spec.model_prefix = os.path.basename(model_path)[:-len(".model")]
    with open(model_path, "wb") as f:
        f.write(m.SerializeToString())


def _read_marker(root: str, params: dict) -> dict | None:
    """The marker if ``root`` is a finished build of exactly these parameters, with every file
    present at its recorded size; otherwise None (and the root gets rebuilt)."""
    try:
        with open(os.path.join(root, "DONE.json")) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if marker.get("format_version") != FORMAT_VERSION or marker.get("params") != params:
        return None
    for rel, size in marker.get("files", {}).items():
        try:
            if os.path.getsize(os.path.join(root, rel)) != size:
                return None
        except OSError:
            return None
    return marker


_OURS = {"train", "eval", "tokenizer", "DONE.json", "DONE.json.partial"}


def _check_replaceable(root: str) -> None:
    """Refuse to delete a folder that is not (a piece of) a demo build: --out may be a typo."""
    if os.path.isdir(root):
        extra = set(os.listdir(root)) - _OURS
        if extra:
            raise FileExistsError(
                f"{root} exists and holds files the demo did not write ({sorted(extra)[:5]}); "
                "refusing to replace it. Pick an empty or new folder.")
    elif os.path.exists(root):
        raise FileExistsError(f"{root} exists and is not a folder")


def _data(root: str, marker: dict, built: bool) -> DemoData:
    ev = lambda s: os.path.join(root, "eval", s, f"{s}.yaml")  # noqa: E731
    return DemoData(
        root=root, train_urls=os.path.join(root, "train", _brace(marker["train_shards"])),
        zeroshot_yaml=ev("zeroshot"), zeroshot_shape_yaml=ev("zeroshot_shape"), retrieval_yaml=ev("retrieval"), refexp_yaml=ev("refexp"),
        segmentation_yaml=ev("segmentation"), tokenizer_path=os.path.join(root, "tokenizer", "demo_sp.model"),
        num_train=marker["counts"]["train"], built=built)


def ensure_demo(root, num_train: int = 20000, seed: int = 0, workers: int = 2, *,
                num_zeroshot: int = 800, num_retrieval: int = 500, num_refexp: int = 500,
                num_segmentation: int = 500, num_zeroshot_shape: int | None = None) -> DemoData:
    """The demo data under ``root``, generated on first use and reused after.

    Crash- and race-safe because DDP ranks call this at once and a killed run must not leave a
    cache that looks finished: generation goes to a temp sibling that is renamed into place
    only after ``DONE.json`` is written, and all of it happens under an exclusive ``fcntl`` lock
    on ``<root>.lock`` (local file systems; on NFS let rank 0 build first). A root whose marker
    is missing, names other parameters, or lists a file that is gone is rebuilt, never read.
    """
    root = os.path.abspath(os.fspath(root))
    params = {"num_train": int(num_train), "seed": int(seed),
              "eval_sizes": {"zeroshot": int(num_zeroshot),
                             "zeroshot_shape": int(num_zeroshot if num_zeroshot_shape is None else num_zeroshot_shape),
                             "retrieval": int(num_retrieval), "refexp": int(num_refexp),
                             "segmentation": int(num_segmentation)}}
    if min(params["eval_sizes"].values()) < 1 or num_train < 1:
        raise ValueError(f"every split needs at least one sample, got {params}")
    parent, base = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    with open(root + ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            marker = _read_marker(root, params)
            if marker is not None:
                return _data(root, marker, built=False)
            _check_replaceable(root)
            for name in os.listdir(parent):  # leftovers of killed builds; we hold the lock
                if name.startswith(base + ".tmp-") or name.startswith(base + ".old-"):
                    shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            tmp = os.path.join(parent, f"{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.makedirs(tmp)
            try:
                _build(tmp, params, workers)
                if os.path.exists(root):
                    old = os.path.join(parent, f"{base}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
                    os.rename(root, old)
                    os.rename(tmp, root)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, root)
            finally:
                if os.path.exists(tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
            marker = _read_marker(root, params)
            assert marker is not None, "demo build finished but its marker does not validate"
            return _data(root, marker, built=True)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------
# Looking at it
# ----------------------------------------------------------------------------------------
_MASK_PALETTE = np.array([(0, 0, 0)] + [tuple(int(255 * v) for v in colorsys.hsv_to_rgb(i / 8, 0.8, 1.0))
                                         for i in range(len(CATEGORIES))], dtype=np.uint8)


def _font(size: int):
    from PIL import ImageFont

    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default()


def render_grid(urls, out_png: str, n: int = 16, cols: int = 4, cell: int = 200) -> str:
    """Samples with their region boxes, masks and captions in one PNG, for a person to check
    that boxes sit on the shapes and captions say what is drawn. Reads through webdataset,
    the way training does. (DejaVu has no CJK/Devanagari glyphs: those captions show boxes.)"""
    import textwrap

    import webdataset as wds

    # decoded by hand: wds' "pil" decoder turns the L-mode mask into RGB
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    font = _font(11)
    tiles = []
    for s in ds:
        meta = json.loads(s["json"])
        caption = s["txt"].decode("utf-8")
        img = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        w, h = img.size
        k = (cell - 4) / max(w, h)
        img = img.resize((max(1, round(w * k)), max(1, round(h * k))), Image.NEAREST)
        seg = np.asarray(Image.open(io.BytesIO(s["seg.png"])))
        mimg = Image.fromarray(_MASK_PALETTE[seg]).resize(img.size, Image.NEAREST)
        tile = Image.new("RGB", (2 * cell, cell + 70), (255, 255, 255))
        tile.paste(img, (2, 2))
        tile.paste(mimg, (cell + 2, 2))
        d = ImageDraw.Draw(tile)
        for j, r in enumerate(meta["regions"]):
            x1, y1, x2, y2 = r["box"]
            for ox in (2, cell + 2):
                d.rectangle([ox + x1 * img.width, 2 + y1 * img.height, ox + x2 * img.width - 1,
                             2 + y2 * img.height - 1], outline=(0, 255, 255) if ox == 2 else (255, 255, 255))
            d.text((2 + x1 * img.width + 1, 2 + y1 * img.height), str(j), fill=(0, 255, 255), font=font)
        label = f"[{meta['lang']} {w}x{h}] " + caption + " | " + "; ".join(
            f"{j}:{r['caption']}" for j, r in enumerate(meta["regions"]))
        d.multiline_text((2, cell + 2), "\n".join(textwrap.wrap(label, 62)[:5]), fill=(0, 0, 0), font=font)
        tiles.append(tile)
        if len(tiles) >= n:
            break
    if not tiles:
        raise ValueError(f"no samples found in {urls}")
    rows = math.ceil(len(tiles) / cols)
    tw, th = tiles[0].size
    grid = Image.new("RGB", (cols * tw, rows * th), (128, 128, 128))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * tw, (i // cols) * th))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    grid.save(out_png)
    return out_png


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m siglip2.data.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="root folder of the demo data")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--grid", default=None, help="also render 16 train samples to this PNG")
    a = p.parse_args(list(argv) if argv is not None else None)
    # Import ourselves by package name so worker processes unpickle siglip2.data.demo._write_shard
    # rather than a __main__ that spawn cannot re-import.
    from siglip2.data.demo import ensure_demo as _ensure, render_grid as _render

    t0 = time.perf_counter()
    d = _ensure(a.out, num_train=a.num_train, seed=a.seed, workers=a.workers)
    dt = time.perf_counter() - t0
    print(f"{'built' if d.built else 'reused'} demo data in {dt:.1f}s at {d.root}")
    for k in ("train_urls", "zeroshot_yaml", "zeroshot_shape_yaml", "retrieval_yaml", "refexp_yaml", "segmentation_yaml", "tokenizer_path"):
        print(f"  {k}: {getattr(d, k)}")
    if a.grid:
        print("  grid:", _render(d.train_urls, a.grid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
