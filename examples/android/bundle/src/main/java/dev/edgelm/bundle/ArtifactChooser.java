package dev.edgelm.bundle;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Comparator;
import java.util.List;
import java.util.Set;

/**
 * Picks the artifact a phone runs. Formats are tried in a stated order — GGUF (llama.cpp),
 * ExecuTorch, LiteRT, ONNX Runtime — skipping any whose runtime the app was not built with
 * and any that failed its parity gate at export; within a format the smallest file wins.
 */
public final class ArtifactChooser {
    public static final List<String> FALLBACK_ORDER = Arrays.asList("gguf", "executorch", "tflite", "onnx");

    private ArtifactChooser() {
    }

    /** Artifacts this app can run, best first. */
    public static List<Artifact> candidates(BundleManifest manifest, Set<String> availableRuntimes) {
        List<Artifact> out = new ArrayList<>();
        for (String format : FALLBACK_ORDER) {
            List<Artifact> ofFormat = new ArrayList<>();
            for (Artifact a : manifest.artifacts) {
                if (a.format.equals(format) && availableRuntimes.contains(a.runtime) && !Boolean.FALSE.equals(a.parityPassed)) {
                    ofFormat.add(a);
                }
            }
            ofFormat.sort(Comparator.comparingLong(a -> a.bytes));
            out.addAll(ofFormat);
        }
        return out;
    }

    public static Artifact choose(BundleManifest manifest, Set<String> availableRuntimes) throws BundleException {
        List<Artifact> found = candidates(manifest, availableRuntimes);
        if (found.isEmpty()) {
            StringBuilder have = new StringBuilder();
            for (Artifact a : manifest.artifacts) have.append(have.length() == 0 ? "" : ", ").append(a.name).append(" [").append(a.runtime).append("]");
            throw new BundleException("no artifact this app can run (runtimes here: " + availableRuntimes
                    + "); the bundle has: " + have + " — export with --target android");
        }
        return found.get(0);
    }
}
