// The reply's text as it plays: the word being spoken highlighted (from the server's `marks`), and, once an
// utterance was cut short (Stop, or the user talking over it), what was not heard struck through.

/** UTF-16 index of each code point of `text` (and of its end): the server counts characters as code points. */
function codePointOffsets(text) {
  const offsets = [];
  let index = 0;
  for (const character of text) {
    offsets.push(index);
    index += character.length;
  }
  offsets.push(index);
  return offsets;
}

export class Reply {
  constructor(element) {
    this.element = element;
    this.text = "";
    this.words = [];         // from `marks`: {text, startMs, endMs, start, end} (start/end: UTF-16 indices in text)
    this.offsets = [0];
    this.current = -1;       // index in words of the highlighted word
    this.cut = null;         // {heardText, heardMs} once the utterance was cut short
    this.highlighted = [];   // every word highlighted, in order (for the browser test): {text, startMs, charStart}
  }

  /** A new utterance: its text (so far; a streamed one grows with setText). */
  begin(text) {
    this.text = text;
    this.offsets = codePointOffsets(text);
    this.words = [];
    this.current = -1;
    this.cut = null;
    this.highlighted = [];
    this.render();
  }

  setText(text) {
    if (text === this.text) return;
    this.text = text;
    this.offsets = codePointOffsets(text);
    this.render();
  }

  /** Words of a `marks` message (times on the utterance's audio clock, characters as the server counts them). */
  addMarks(words) {
    for (const word of words) {
      const start = this.offsets[word.charStart];
      const end = this.offsets[word.charEnd];
      if (start === undefined || end === undefined || end < start) continue;  // not in the text shown: skipped
      this.words.push({...word, start, end});
    }
    this.words.sort((a, b) => a.startMs - b.startMs);
  }

  /** Playback is at `ms` of the utterance: highlight the last word whose start it has passed. */
  at(ms) {
    if (this.cut) return;
    let index = -1;
    while (index + 1 < this.words.length && this.words[index + 1].startMs <= ms) index += 1;
    if (index === this.current) return;
    this.current = index;
    if (index >= 0) {
      const word = this.words[index];
      this.highlighted.push({text: word.text, startMs: word.startMs, charStart: word.charStart});
    }
    this.render();
  }

  /** Playback ended by itself: nothing is highlighted any more. */
  done() {
    if (this.current === -1) return;
    this.current = -1;
    this.render();
  }

  /** The utterance was cut short: `heardText` (a prefix of the text) was heard, the rest was not; without word times
   * (heardText null) only the milliseconds heard are known. */
  stopped(heardText, heardMs) {
    this.cut = {heardText, heardMs};
    this.current = -1;
    this.render();
  }

  /** The text up to the last word that had ended by `ms` (null without word times), as the server says it. */
  heardTextAt(ms, haveMarks) {
    if (!haveMarks) return null;
    let end = 0;
    for (const word of this.words) if (word.endMs <= ms) end = Math.max(end, word.end);
    return this.text.slice(0, end);
  }

  render() {
    const parts = [];
    const text = this.text;
    if (this.cut && this.cut.heardText !== null && this.cut.heardText !== undefined) {
      const heard = text.startsWith(this.cut.heardText) ? this.cut.heardText : text.slice(0, this.cut.heardText.length);
      const heardSpan = document.createElement("span");
      heardSpan.className = "heard";
      heardSpan.textContent = heard;
      parts.push(heardSpan);
      if (heard.length < text.length) {
        const unheard = document.createElement("s");
        unheard.className = "unheard";
        unheard.title = "not heard: cut short";
        unheard.textContent = text.slice(heard.length);
        parts.push(unheard);
      }
    } else if (this.current >= 0) {
      const word = this.words[this.current];
      const mark = document.createElement("mark");
      mark.textContent = text.slice(word.start, word.end);
      parts.push(text.slice(0, word.start), mark, text.slice(word.end));
    } else {
      parts.push(text);
    }
    if (this.cut && (this.cut.heardText === null || this.cut.heardText === undefined)) {
      const note = document.createElement("span");
      note.className = "heard-ms";
      note.textContent = ` heard ${Math.round(this.cut.heardMs)} ms`;
      parts.push(note);
    }
    this.element.replaceChildren(...parts);
  }
}
