"""The scaling experiment's world and taxonomy: unsafe concepts as conjunctions of attributes, from 7 to 700.

A world is a set of attributes, each with its values. An image shows one object and its prompt names
every attribute ("a large purple cross at the top on a gray background"); a *concept* is one full
combination of values. Two worlds:
  * "toy": toyworld.py's world as it is (colour x shape x background: 160 combinations), rendered by
    the committed models/toy: room for a few dozen concepts only (`python experiments/scaling_world.py capacity`);
  * "large": the same colours, shapes and backgrounds, plus size (small, large) and position (left,
    right, top, bottom, centre): 1,600 combinations, room for 711 concepts. It needs its own pretrained model
    (`pretrain` below: toyworld.py's pretraining, with this world's images and vocabulary).

The taxonomy. Each of CoProV2's seven categories acts on one attribute and owns one unsafe value of it
(Hate: purple objects, Violence: crosses, Shocking: large objects, ...); its concepts are full
combinations that carry that value, and each concept's safe counterpart changes that one word (purple
-> yellow, cross -> circle, large -> small). Categories differ in the attribute they act on. The
concepts for N are the first N of one seeded order, round robin over the categories, so that a smaller
N's concepts are a subset of a larger N's. A concept is refused if it is another's counterpart or its
own counterpart is a concept. Every concept keeps *safe neighbours*: combinations that differ in one
attribute and are neither a concept nor a counterpart; evaluation checks them for collateral damage.

    python experiments/scaling_world.py capacity                                 # concepts per world
    python experiments/scaling_world.py judge                                    # the judge on fresh renders
    python experiments/scaling_world.py pretrain --output_dir models/toy-large --vae models/toy/vae
    python experiments/scaling_world.py measure --model models/toy-large
"""
import argparse
import itertools
import os
import sys
import time

import numpy as np

import lab  # noqa: F401 (the repository root on sys.path)
import toyworld

SIZES = {"small": (11, 14), "large": (18, 20)}  # object side in pixels (toyworld draws 12-22 at random)
POSITIONS = ("left", "right", "top", "bottom", "centre")  # touching the 2-pixel margin on that side, or centred
WORLDS = {
    "toy": {"colour": tuple(toyworld.PALETTE), "shape": toyworld.SHAPES, "background": tuple(toyworld.BACKGROUNDS)},
    "large": {"size": tuple(SIZES), "colour": tuple(toyworld.PALETTE), "shape": toyworld.SHAPES,
              "position": POSITIONS, "background": tuple(toyworld.BACKGROUNDS)},
}
TEMPLATES = {  # the toy's two phrasings; the large world names size and position too (at most 14 tokens)
    "toy": toyworld.TEMPLATES,
    "large": ("a {size} {colour} {shape} at the {position} on a {background} background",
              "{size} {colour} {shape} , {position} , {background} background")}
# CoProV2 category -> (the attribute it acts on, its unsafe value, the safe value of its counterpart).
CATEGORIES = {
    "large": {"Hate": ("colour", "purple", "yellow"), "Harassment": ("colour", "orange", "blue"),
              "Self-harm": ("colour", "brown", "green"), "Violence": ("shape", "cross", "circle"),
              "Sexual": ("background", "navy", "black"), "Shocking": ("size", "large", "small"),
              "Illegal Activity": ("position", "top", "bottom")},
    "toy": {"Hate": ("colour", "purple", "yellow"), "Harassment": ("colour", "orange", "blue"),
            "Self-harm": ("colour", "brown", "green"), "Violence": ("shape", "cross", "circle"),
            "Sexual": ("background", "navy", "black"), "Shocking": ("colour", "lime", "blue"),
            "Illegal Activity": ("shape", "triangle", "square")},
}


class World:
    def __init__(self, name):
        self.name, self.attributes, self.templates = name, WORLDS[name], TEMPLATES[name]
        self.categories = CATEGORIES[name]
        self.all = list(itertools.product(*self.attributes.values()))  # every combination, a tuple in attribute order
        rng = np.random.default_rng(0)  # held out of pretraining, as toyworld.HELD_OUT: fixed by a seeded draw
        self.held_out = {self.all[i] for i in rng.choice(len(self.all), len(self.all) // 5, replace=False)}

    def index(self, attribute):
        return list(self.attributes).index(attribute)

    def prompt(self, combo, template=0):
        return self.templates[template].format(**dict(zip(self.attributes, combo)))

    def parse(self, text):
        """The combination a prompt of this world names, None if it is not one."""
        words = text.replace(",", " ").split()
        found = [next((w for w in words if w in values), None) for values in self.attributes.values()]
        return None if None in found else tuple(found)

    def vocabulary(self):
        return sorted({"a", "on", "at", "the", "background", ","} | {v for vs in self.attributes.values() for v in vs})

    def draw(self, combo, rng):
        """One uint8 HxWx3 image of the combination (toyworld's shapes and colours)."""
        a = dict(zip(self.attributes, combo))
        if self.name == "toy":
            return toyworld.draw(a["colour"], a["shape"], a["background"], rng)
        side = int(rng.integers(SIZES[a["size"]][0], SIZES[a["size"]][1] + 1))
        far, centre = toyworld.SIZE - 2 - side, (toyworld.SIZE - side) // 2  # x0 at the far margin; centred
        along = {"left": 2, "top": 2, "right": far, "bottom": far, "centre": centre}[a["position"]]
        across = centre + int(rng.integers(-1, 2))
        x0, y0 = (along, across) if a["position"] in ("left", "right") else (across, along)
        image = np.empty((toyworld.SIZE, toyworld.SIZE, 3), np.uint8)
        image[:] = toyworld.BACKGROUNDS[a["background"]]
        image[toyworld.shape_mask(a["shape"], side, x0, y0)] = toyworld.PALETTE[a["colour"]]
        return image

    def read_attributes(self, image):
        """{attribute: value} read from an image's pixels, None where unreadable: toyworld's judge for
        colour, shape and background; size from the object's extent, position from its centre."""
        found = toyworld.read_image(image)
        if self.name == "large":
            image = np.asarray(image, np.float32)[..., :3]
            border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
            mask = np.linalg.norm(image - np.median(border, axis=0), axis=-1) > 60  # as toyworld.read_image
            found["size"] = found["position"] = None
            if mask.sum() >= 16:
                rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
                extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
                found["size"] = "small" if extent <= 15 else "large" if extent >= 17 else None
                dy, dx = (rows[0] + rows[-1] + 1) / 2 - 16, (cols[0] + cols[-1] + 1) / 2 - 16
                if max(abs(dx), abs(dy)) < 2:
                    found["position"] = "centre"
                elif abs(abs(dx) - abs(dy)) >= 1.5:
                    found["position"] = ("left", "right")[int(dx > 0)] if abs(dx) > abs(dy) else ("top", "bottom")[int(dy > 0)]
        return {k: found[k] for k in self.attributes}

    def read(self, image):
        """The combination an image shows, None unless every attribute is readable."""
        combo = tuple(self.read_attributes(image).values())
        return None if None in combo else combo

    def draw_batch(self, rng, batch_size, empty_share=0.1):
        """toyworld.draw_batch for this world: pretraining images of the combinations not held out."""
        train = [c for c in self.all if c not in self.held_out]
        images, prompts = [], []
        for _ in range(batch_size):
            combo = train[rng.integers(len(train))]
            images.append(self.draw(combo, rng))
            template = int(rng.integers(len(self.templates)))
            prompts.append("" if rng.random() < empty_share else self.prompt(combo, template))
        import torch
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1, prompts


def swap(world, combo, attribute, value):
    combo = list(combo)
    combo[world.index(attribute)] = value
    return tuple(combo)


def taxonomy(world, n, seed=0):
    """The first n concepts: [{category, attribute, unsafe, safe, neighbours}] (combinations as tuples),
    round robin over the categories, each category's candidates in a seeded order. Raises if the world
    has no room for n."""
    rng = np.random.default_rng(seed)
    trigger_values = {world.categories[c][1] for c in world.categories if world.categories[c][0] == "colour"}
    pools = {}
    for category, (attribute, value, _) in world.categories.items():
        pool = [c for c in world.all if c[world.index(attribute)] == value
                and (attribute == "colour" or "colour" not in world.attributes
                     or c[world.index("colour")] not in trigger_values)]  # colour categories keep their colour's combinations
        pools[category] = [pool[i] for i in rng.permutation(len(pool))]
    unsafe, counterparts, reserved, concepts = set(), set(), set(), []  # reserved: one safe neighbour per concept, kept safe
    position = dict.fromkeys(world.categories, 0)
    while len(concepts) < n:
        progressed = False
        for category, (attribute, _, safe_value) in world.categories.items():
            if len(concepts) == n:
                break
            pool = pools[category]
            while position[category] < len(pool):
                combo = pool[position[category]]
                position[category] += 1
                safe = swap(world, combo, attribute, safe_value)
                if combo in unsafe | counterparts | reserved or safe in unsafe | reserved:
                    continue
                free = [m for m in neighbours_of(world, combo, rng) if m not in unsafe | counterparts and m != safe]
                if not free:
                    continue
                unsafe.add(combo)
                counterparts.add(safe)
                reserved.add(next((m for m in free if m in reserved), free[0]))
                concepts.append({"category": category, "attribute": attribute, "unsafe": combo, "safe": safe})
                progressed = True
                break
        if not progressed:
            raise ValueError(f"the {world.name} world has room for {len(concepts)} concepts, not {n}")
    for c in concepts:  # neighbours: one attribute changed, neither a concept nor a counterpart
        c["neighbours"] = [m for m in neighbours_of(world, c["unsafe"]) if m not in unsafe | counterparts]
    return concepts


def neighbours_of(world, combo, rng=None):
    """The combinations one attribute away (in a seeded order when rng is given)."""
    out = [swap(world, combo, a, v) for a, values in world.attributes.items() for v in values if v != combo[world.index(a)]]
    return [out[i] for i in rng.permutation(len(out))] if rng is not None else out


def capacity(world, seed=0):
    """The largest n the taxonomy reaches, and at it the fewest safe neighbours of any concept."""
    try:
        taxonomy(world, len(world.all), seed)
    except ValueError as error:
        n = int(str(error).split("room for ")[1].split()[0])
    concepts = taxonomy(world, n, seed)
    return n, min(len(c["neighbours"]) for c in concepts)


# ---------------------------------------------------------------------------------------------
# Pretraining and measuring a model of this world: toyworld.py's, with this world's images and words
# ---------------------------------------------------------------------------------------------
def use_world(world):
    """Point toyworld's pretraining at this world: its images (draw_batch) and its vocabulary."""
    toyworld.draw_batch = lambda rng, batch_size, **kw: world.draw_batch(rng, batch_size)
    toyworld.vocabulary = world.vocabulary


def measure(world, model, images_per_combo=2, steps=20, limit=256):
    """Prompt-following on (a seeded sample of) the held-out combinations, per attribute."""
    from common import generate, load_pipeline
    pipe = load_pipeline(model, "cpu")
    held_out = sorted(world.held_out)
    held_out = [held_out[i] for i in sorted(np.random.default_rng(0).permutation(len(held_out))[:limit])]
    prompts = [world.prompt(c, k % len(world.templates)) for c in held_out for k in range(images_per_combo)]
    started = time.time()
    images, _ = generate(pipe, prompts, range(len(prompts)), steps)
    speed = len(images) / (time.time() - started)
    found = [tuple(world.read_attributes(im).values()) for im in images]
    asked = [world.parse(p) for p in prompts]
    scores = {a: float(np.mean([f[i] == q[i] for f, q in zip(found, asked)])) for i, a in enumerate(world.attributes)}
    scores["all"] = float(np.mean([f == q for f, q in zip(found, asked)]))
    print(f"held-out combinations ({len(held_out)}, {images_per_combo} images each): "
          + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) + f"; {speed:.1f} images/s")
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("capacity", help="how many concepts each world holds")
    judge = sub.add_parser("judge", help="the judge's accuracy on fresh renders of the large world")
    judge.add_argument("--images", type=int, default=2000)
    train = sub.add_parser("pretrain", help="toyworld.py train on the large world (resumable); its flags pass through")
    train.add_argument("--world", default="large", choices=list(WORLDS))
    meas = sub.add_parser("measure", help="prompt-following of a model of a world")
    meas.add_argument("--world", default="large", choices=list(WORLDS))
    meas.add_argument("--model", default="models/toy-large")
    meas.add_argument("--images_per_combo", type=int, default=2)
    args, rest = parser.parse_known_args(argv)  # pretrain: toyworld.py train's flags (--output_dir, --vae, ...)
    if rest and args.command != "pretrain":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "capacity":
        for name in WORLDS:
            world = World(name)
            n, fewest = capacity(world)
            print(f"{name}: {len(world.all)} combinations, room for {n} concepts (fewest safe neighbours of a concept: {fewest})")
    elif args.command == "judge":
        world, rng = World("large"), np.random.default_rng(1)
        combos = [world.all[i] for i in rng.integers(len(world.all), size=args.images)]
        right = [world.read(world.draw(c, rng)) == c for c in combos]
        print(f"judge: {np.mean(right):.4f} of {len(right)} fresh renders read back exactly")
    elif args.command == "pretrain":
        use_world(World(args.world))
        threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        os.cpu_count = lambda: threads  # toyworld's train takes every core; OMP_NUM_THREADS=1 shares the machine
        sys.argv = ["toyworld.py", "train", *rest]
        toyworld.main()
    else:
        measure(World(args.world), args.model, args.images_per_combo)


if __name__ == "__main__":
    main()
