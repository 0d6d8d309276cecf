package dev.edgelm.bundle;

/** One artifact entry of manifest.json (the fields the app needs). */
public final class Artifact {
    public final String name;
    public final String format;
    public final String path;
    public final String sha256;
    public final long bytes;
    public final String quant;
    public final String runtime;
    public final int maxContext;
    /** Whether it passed its parity gate at export; null when it was not measured. */
    public final Boolean parityPassed;
    /** Decode tokens/s measured at export (on the export machine), or 0. */
    public final double decodeTokPerS;

    public Artifact(String name, String format, String path, String sha256, long bytes, String quant, String runtime,
                    int maxContext, Boolean parityPassed, double decodeTokPerS) {
        this.name = name;
        this.format = format;
        this.path = path;
        this.sha256 = sha256;
        this.bytes = bytes;
        this.quant = quant;
        this.runtime = runtime;
        this.maxContext = maxContext;
        this.parityPassed = parityPassed;
        this.decodeTokPerS = decodeTokPerS;
    }

    @Override
    public String toString() {
        return name + " (" + format + ", " + quant + ", " + bytes / 1_000_000 + " MB)";
    }
}
