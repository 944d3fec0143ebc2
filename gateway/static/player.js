// Gapless playback of streamed PCM, and microphone recording, at the AudioContext's rate.

export class StreamPlayer {
  constructor(context) {
    this.context = context;
    // stalls: times playback ran dry while audio was still coming (stalledSamples: for how long, in all)
    this.stats = {samplesScheduled: 0, samplesPlayed: 0, buffered: 0, stalls: 0, stalledSamples: 0};
    this.node = null;        // the pcm-player worklet (secure contexts)
    this.sources = new Set(); // scheduled buffers (the fallback elsewhere)
    this.nextTime = 0;
  }

  async init() {
    if (this.context.audioWorklet) {
      await this.context.audioWorklet.addModule("/static/worklets.js");
      this.node = new AudioWorkletNode(this.context, "pcm-player", {outputChannelCount: [1]});
      this.node.port.onmessage = ({data}) => {
        this.stats.samplesPlayed = data.played;
        this.stats.buffered = data.buffered;
        this.stats.stalls = data.stalls;
        this.stats.stalledSamples = data.stalledSamples;
      };
      this.node.connect(this.context.destination);
    }
    return this;
  }

  get mode() { return this.node ? "worklet" : "scheduled buffers"; }

  /** Queue a chunk right after the previous one. */
  push(samples) {
    this.stats.samplesScheduled += samples.length;
    if (this.node) {
      this.node.port.postMessage(samples, [samples.buffer]);
      return;
    }
    // Without a worklet (plain http on another host): buffers scheduled back to back on the audio clock.
    const buffer = this.context.createBuffer(1, samples.length, this.context.sampleRate);
    buffer.copyToChannel(samples, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    const now = this.context.currentTime;
    if (this.nextTime < now) {
      if (this.sources.size || this.stats.samplesScheduled > samples.length) {  // ran dry mid-utterance
        this.stats.stalls += 1;
        this.stats.stalledSamples += Math.round((now - this.nextTime) * this.context.sampleRate);
      }
      this.nextTime = now + 0.05;
    }
    source.start(this.nextTime);
    this.nextTime += buffer.duration;
    this.sources.add(source);
    source.onended = () => {
      this.sources.delete(source);
      this.stats.samplesPlayed += samples.length;
    };
    this.stats.buffered = Math.round((this.nextTime - now) * this.context.sampleRate);
  }

  /** The utterance's audio is all queued: running dry from now on is the end, not an underrun. */
  end() {
    if (this.node) this.node.port.postMessage({type: "end"});
  }

  /** Silence now: drop what is queued. */
  clear() {
    if (this.node) this.node.port.postMessage({type: "clear"});
    for (const source of this.sources) source.stop();
    this.sources.clear();
    this.nextTime = 0;
    this.stats.buffered = 0;
  }
}

export class Recorder {
  // Its own AudioContext at the device's rate: some browsers (Firefox) refuse to connect a microphone to a
  // context running at another rate (the player's is 24 kHz). The server resamples uploads.
  constructor() {
    this.context = null;
    this.chunks = [];
  }

  static available() {
    return Boolean(window.isSecureContext && navigator.mediaDevices && window.AudioWorkletNode);
  }

  get sampleRate() {
    return this.context.sampleRate;
  }

  async start() {
    this.context = new AudioContext();
    try {
      this.stream = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: false}});
      await this.context.audioWorklet.addModule("/static/worklets.js");
      this.source = this.context.createMediaStreamSource(this.stream);
      this.node = new AudioWorkletNode(this.context, "pcm-recorder");
    } catch (error) {  // no microphone, or no permission: nothing stays open
      if (this.stream) for (const track of this.stream.getTracks()) track.stop();
      this.context.close();
      throw error;
    }
    this.node.port.onmessage = ({data}) => this.chunks.push(data);
    this.source.connect(this.node);
    this.chunks = [];
  }

  get seconds() {
    return this.chunks.reduce((n, c) => n + c.length, 0) / this.context.sampleRate;
  }

  stop() {
    this.source.disconnect();
    this.node.port.onmessage = null;
    this.node.port.postMessage("stop");  // the processor then ends, and the node can be collected
    for (const track of this.stream.getTracks()) track.stop();
    this.context.close();
    return this.chunks;
  }
}
