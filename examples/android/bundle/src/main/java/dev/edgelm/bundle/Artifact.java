package dev.edgelm.bundle;

import java.util.Collections;
import java.util.List;

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
    /** The export's run of the artifact in its vendor's LLM runtime (null when none was made). */
    public final VendorCheck vendorCheck;

    public Artifact(String name, String format, String path, String sha256, long bytes, String quant, String runtime,
                    int maxContext, Boolean parityPassed, double decodeTokPerS, VendorCheck vendorCheck) {
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
        this.vendorCheck = vendorCheck;
    }

    /** What `edgelm export` recorded of running the artifact in the vendor's runtime. */
    public static final class VendorCheck {
        /** The Python package that ran it (VendorRuntime.checkedPackage) and its version. */
        public final String packageName;
        public final String version;
        /** "passed", or why not. */
        public final String result;
        /** Bundle files that runtime loads beside or instead of the artifact (a .litertlm, genai_config.json). */
        public final List<String> files;

        public VendorCheck(String packageName, String version, String result, List<String> files) {
            this.packageName = packageName;
            this.version = version;
            this.result = result;
            this.files = Collections.unmodifiableList(files);
        }

        public boolean passed() {
            return "passed".equals(result);
        }
    }

    @Override
    public String toString() {
        return name + " (" + format + ", " + quant + ", " + bytes / 1_000_000 + " MB)";
    }
}
