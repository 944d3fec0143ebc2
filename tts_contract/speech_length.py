"""How long speech is, by the length of its text, in codec frames (12.5 a second): what to expect, for the
engine's capacity, memory and retry estimates; and the cap that stops a stream whose speech never ends (random
weights never end it, and real weights sometimes do not either). Real speech runs at about 0.8 frames per
character; a test checks that the cap stays above the expectation for every length."""

# Expected: 12 + 1.2 per character, on the long side of real speech (0.8 per character, with a start and an end
# the model pads): an estimate that runs short would let admission promise rows and KV memory it does not have.
EXPECTED_FRAMES_BASE = 12
EXPECTED_FRAMES_PER_CHAR = 1.2
# The cap: well beyond any real speech of the text, so it only stops runaway generation.
CAP_FRAMES_BASE = 25
CAP_FRAMES_PER_CHAR = 3.0


def frame_cap(characters: int, base: int = CAP_FRAMES_BASE, per_char: float = CAP_FRAMES_PER_CHAR) -> int:
    """The most tokens a stream of ``characters`` characters samples (its last one never becomes a frame)."""
    return int(base) + int(per_char * characters)


def expected_frames(characters: int, cap: "int | None" = None) -> float:
    """Frames the speech of ``characters`` characters should take, within its ``cap`` (tokens) if it has one."""
    expected = EXPECTED_FRAMES_BASE + EXPECTED_FRAMES_PER_CHAR * characters
    return expected if cap is None else min(cap - 1, expected)
