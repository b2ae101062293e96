"""Pictures of attention: for a text, how much each character weighs every earlier character, per layer and head.

The weights come from the GPT's own forward pass (`GPT.attention`). The picture is a grid of panels, one row per
layer and one column per head. In a panel, row i is the character at position i (its query) and column j a character
it may attend to (its key); the colour is the weight, linear from 0 (white) to 1 (dark blue), and grey cells are later
characters, which attention never sees. The characters label both axes; a newline shows as an arrow, a space as a dot.
"""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from charlm.models import GPT
from charlm.tokenizers import Tokenizer, labels

MAX_CHARS = 64  # a longer text is cut to its first MAX_CHARS characters (12 pixels each), with a note in the picture
CELL = 12  # pixels per character
LINE = 16  # pixels per line of text
GAP = 16  # pixels between panels
WHITE, BLUE, GREY = np.array([255, 255, 255]), np.array([8, 48, 107]), np.array([215, 215, 215])


def attention_picture(net: GPT, tokenizer: Tokenizer, ids: list[int]) -> tuple[Image.Image, str]:
    """The picture of net's attention over a text's token ids, and a note (empty unless the text had to be cut)."""
    keep = min(MAX_CHARS, net.block_size)
    note = f"showing the first {keep} of its {len(ids)} {tokenizer.unit}" if len(ids) > keep else ""
    ids = ids[:keep]
    weights = net.attention(torch.tensor([ids], device=net.wte.weight.device))[:, 0].float().cpu()  # (L, nh, T, T)
    return draw(weights, labels(tokenizer, ids), note), note


def draw(weights: torch.Tensor, text: list[str], note: str) -> Image.Image:
    n_layer, n_head, T, _ = weights.shape
    side = T * CELL
    panel_width, panel_height = CELL + side + GAP, LINE + CELL + side + GAP
    top = 3 * LINE  # title, colour scale, note
    font = ImageFont.load_default(size=CELL - 1)
    title = (
        "attention weights: rows are layers, columns heads; in a panel, row = character, column = what it attends to"
    )
    width = max(GAP + n_head * panel_width, GAP + int(max(font.getlength(title), font.getlength(note))) + GAP)
    height = top + n_layer * panel_height

    # the cells, as an array: each weight becomes a CELL x CELL square
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    colours = WHITE + weights.clamp(0, 1).numpy()[..., None] * (BLUE - WHITE)  # (n_layer, n_head, T, T, 3)
    colours[:, :, np.triu(np.ones((T, T), dtype=bool), k=1)] = GREY
    colours = colours.round().astype(np.uint8).repeat(CELL, axis=2).repeat(CELL, axis=3)
    corners = {}  # (layer, head) -> the top-left pixel of that panel's cells
    for layer in range(n_layer):
        for head in range(n_head):
            x, y = GAP + head * panel_width + CELL, top + layer * panel_height + LINE + CELL
            pixels[y : y + side, x : x + side] = colours[layer, head]
            corners[layer, head] = x, y
    scale = np.linspace(0, 1, 160)[None, :, None] * (BLUE - WHITE) + WHITE  # the colour scale, 160 x 10 pixels
    pixels[LINE + 3 : LINE + 13, GAP + 20 : GAP + 180] = scale.round().astype(np.uint8)

    image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    pen.text((GAP, 2), title, font=font, fill="black")
    pen.text((GAP, LINE + 1), "0", font=font, fill="black")
    pen.text((GAP + 186, LINE + 1), "1    linear; grey: later characters, never seen", font=font, fill="black")
    if note:
        pen.text((GAP, 2 * LINE + 1), note, font=font, fill="black")
    # the characters along the panels' edges: drawn once and pasted into every panel (cheaper than drawing them
    # into each of many panels), so no glyph reaches into the cells
    queries, keys = Image.new("RGB", (CELL, side), "white"), Image.new("RGB", (side, CELL), "white")
    query_pen, key_pen = ImageDraw.Draw(queries), ImageDraw.Draw(keys)
    for i, char in enumerate(text):
        draw_char(query_pen, font, 0, i * CELL, char)  # the query characters, down the left
        draw_char(key_pen, font, i * CELL, 0, char)  # the key characters, along the top
    for (layer, head), (x, y) in corners.items():
        pen.text((x, y - CELL - LINE + 2), f"layer {layer + 1}, head {head + 1}", font=font, fill="black")
        image.paste(queries, (x - CELL, y))
        image.paste(keys, (x, y - CELL))
    return image


def draw_char(pen: ImageDraw.ImageDraw, font: ImageFont.FreeTypeFont, x: int, y: int, char: str) -> None:
    """One character centred in the CELL x CELL square at (x, y); a newline as an arrow, a space as a dot."""
    if not char:  # a byte inside a character, which is drawn at its first byte
        return
    if char == "\n":  # the default font has no glyph for it: a hooked arrow, drawn
        pen.line([(x + 9, y + 2), (x + 9, y + 8), (x + 3, y + 8)], fill="black")
        pen.line([(x + 5, y + 6), (x + 3, y + 8), (x + 5, y + 10)], fill="black")
        return
    char = "·" if char == " " else char
    pen.text((x + (CELL - font.getlength(char)) / 2, y), char, font=font, fill="black")
