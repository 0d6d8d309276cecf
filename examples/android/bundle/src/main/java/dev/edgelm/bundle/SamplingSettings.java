package dev.edgelm.bundle;

/** Generation defaults from the manifest, validated, with the overrides a user may set in the app. */
public final class SamplingSettings {
    public final double temperature;
    public final int maxNewTokens;
    public final double repetitionPenalty;
    public final double topP;
    public final int topK;

    public SamplingSettings(double temperature, int maxNewTokens, double repetitionPenalty, double topP, int topK) {
        if (!(temperature >= 0)) throw new IllegalArgumentException("temperature must be >= 0, got " + temperature);
        if (maxNewTokens < 1) throw new IllegalArgumentException("maxNewTokens must be >= 1, got " + maxNewTokens);
        if (!(repetitionPenalty > 0)) throw new IllegalArgumentException("repetitionPenalty must be > 0");
        if (!(topP > 0 && topP <= 1)) throw new IllegalArgumentException("topP must be in (0, 1], got " + topP);
        if (topK < 0) throw new IllegalArgumentException("topK must be >= 0 (0 = off), got " + topK);
        this.temperature = temperature;
        this.maxNewTokens = maxNewTokens;
        this.repetitionPenalty = repetitionPenalty;
        this.topP = topP;
        this.topK = topK;
    }

    public boolean greedy() {
        return temperature == 0.0;
    }

    public SamplingSettings withTemperature(double value) {
        return new SamplingSettings(value, maxNewTokens, repetitionPenalty, topP, topK);
    }

    public SamplingSettings withMaxNewTokens(int value) {
        return new SamplingSettings(temperature, value, repetitionPenalty, topP, topK);
    }
}
