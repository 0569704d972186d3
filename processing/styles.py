"""The paper's two description styles and their lengths, shared by the built-in scenes and the description job."""

# The paper: ShortDesc 20-25 words, LongDesc 60-70 words, in the words of a 3-4 year old.
WORD_RANGES = {"short": (20, 25), "long": (60, 70)}
