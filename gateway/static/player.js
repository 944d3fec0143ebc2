// Gapless playback of streamed PCM (and where it is), microphone recording, and a speech detector on the microphone.

export class StreamPlayer {
  constructor(context) {
    this.context = context;
    // stalls: times playback ran dry while audio was still coming (stalledSamples: for how long, in all)
    this.stats = {samplesScheduled: 0, samplesPlayed: 0, buffered: 0, stalls: 0, stalledSamples: 0};
    this.node = null;        // the pcm-player worklet (secure contexts)
    this.sources = new Set(); // scheduled buffers (the fallback elsewhere)
    this.nextTime = 0;
    // Where the utterance playing is. Each clear() starts a new utterance (epoch) whose samples are counted from 0.
    this.epoch = 0;
    this.pushed = 0;          // samples of this utterance queued
    this.report = null;       // the worklet's last report for this epoch: {position, buffered, time}
    this.scheduled = [];      // the fallback's buffers of this utterance: {start (audio clock), length}
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
        if (data.epoch === this.epoch) this.report = data;
      };
      this.node.connect(this.context.destination);
    }
    return this;
  }

  get mode() { return this.node ? "worklet" : "scheduled buffers"; }

  /** Queue a chunk right after the previous one. */
  push(samples) {
    this.stats.samplesScheduled += samples.length;
    this.pushed += samples.length;
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
    this.scheduled.push({start: this.nextTime, length: samples.length});
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

  /** Silence now: drop what is queued; what is pushed next is a new utterance, its position counted from 0. */
  clear() {
    this.epoch += 1;
    this.pushed = 0;
    this.report = null;
    this.scheduled = [];
    if (this.node) this.node.port.postMessage({type: "clear", epoch: this.epoch});
    for (const source of this.sources) source.stop();
    this.sources.clear();
    this.nextTime = 0;
    this.stats.buffered = 0;
  }

  /** Milliseconds of the utterance (since the last clear) that have come out of the loudspeakers by now, on the
   * AudioContext's own clock: the samples the audio thread has rendered, less the output's latency. */
  positionMs() {
    const rate = this.context.sampleRate;
    const now = this.context.currentTime;
    let samples = 0;
    if (this.node) {
      const report = this.report;  // rendered as of report.time; it went on playing since, unless it had run dry
      if (report) samples = report.position + (report.buffered > 0 ? Math.max(0, now - report.time) * rate : 0);
    } else {
      for (const {start, length} of this.scheduled) samples += Math.min(length, Math.max(0, (now - start) * rate));
    }
    const latency = this.context.outputLatency || this.context.baseLatency || 0;
    return Math.max(0, Math.min(samples, this.pushed) / rate - latency) * 1000;
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

export class SpeechDetector {
  // Listens to the microphone and says when someone speaks (worklets.js, "speech-detector", explains how).
  // Its own AudioContext at the device's rate, as the Recorder's. onChange({speaking}) is called when speech
  // starts and ends; `state` holds the figures ({listening, calibrated, floor, threshold, level, speaking}).
  constructor(onChange) {
    this.onChange = onChange;
    this.context = null;
    this.state = {listening: false, calibrated: false, floor: null, threshold: null, level: 0, speaking: false};
  }

  static available() {
    return Boolean(window.isSecureContext && navigator.mediaDevices && window.AudioWorkletNode);
  }

  async start() {
    this.context = new AudioContext();
    try {
      // Echo cancellation: the reply coming out of the loudspeakers must not count as the user talking.
      this.stream = await navigator.mediaDevices.getUserMedia(
        {audio: {channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false}});
      await this.context.audioWorklet.addModule("/static/worklets.js");
      this.source = this.context.createMediaStreamSource(this.stream);
      this.node = new AudioWorkletNode(this.context, "speech-detector");
    } catch (error) {  // no microphone, or no permission: nothing stays open
      if (this.stream) for (const track of this.stream.getTracks()) track.stop();
      this.context.close();
      throw error;
    }
    this.node.port.onmessage = ({data}) => {
      Object.assign(this.state, data);
      if ("speaking" in data) this.onChange(this.state);
    };
    this.source.connect(this.node);
    if (this.context.state !== "running") await this.context.resume();
    this.state.listening = true;
  }

  stop() {
    if (!this.state.listening) return;
    this.state = {...this.state, listening: false, speaking: false};
    this.source.disconnect();
    this.node.port.onmessage = null;
    this.node.port.postMessage("stop");
    for (const track of this.stream.getTracks()) track.stop();
    this.context.close();
  }
}
