package dev.edgelm.bundle;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.Comparator;
import java.util.List;
import java.util.Map;

/**
 * Picks the artifact a phone runs, and falls back when loading it fails.
 *
 * <p>Formats are tried in a stated order — GGUF (llama.cpp), ExecuTorch, LiteRT-LM, ONNX Runtime
 * GenAI — and within a format the smallest file first. An artifact is a candidate when the app
 * was built with its vendor runtime, that runtime's version runs files the export's vendor check
 * ran ({@link Version#runs}), it passed its parity gate and the vendor check passed. Every other
 * artifact is listed with the reason, so the app can show why it runs what it runs.
 */
public final class ArtifactChooser {
    public static final List<String> FALLBACK_ORDER = Arrays.asList("gguf", "executorch", "tflite", "onnx");

    private ArtifactChooser() {
    }

    /** One artifact of the bundle as the app sees it: runnable here, or the reason it is not. */
    public static final class Candidate {
        public final Artifact artifact;
        public final VendorRuntime runtime;
        /** Null when the app can try it. */
        public final String skipped;

        Candidate(Artifact artifact, VendorRuntime runtime, String skipped) {
            this.artifact = artifact;
            this.runtime = runtime;
            this.skipped = skipped;
        }

        public boolean usable() {
            return skipped == null;
        }

        @Override
        public String toString() {
            return artifact.name + (usable() ? " via " + runtime.androidLibrary : ": " + skipped);
        }
    }

    /** How to open a candidate; any exception or linkage error makes the chooser try the next. */
    public interface Loader<T> {
        T load(Candidate candidate) throws Exception;
    }

    /** What was loaded, and why each artifact before it was not. */
    public static final class Loaded<T> {
        public final Candidate candidate;
        public final T session;
        public final List<String> notes;

        Loaded(Candidate candidate, T session, List<String> notes) {
            this.candidate = candidate;
            this.session = session;
            this.notes = Collections.unmodifiableList(notes);
        }
    }

    /** Every artifact in the order the app tries them: usable ones first (by preference), then the rest. */
    public static List<Candidate> plan(BundleManifest manifest, Map<VendorRuntime, Version> builtWith) {
        List<Candidate> usable = new ArrayList<>();
        List<Candidate> rest = new ArrayList<>();
        List<Artifact> ordered = new ArrayList<>(manifest.artifacts);
        ordered.sort(Comparator.comparingInt((Artifact a) -> rank(a.format)).thenComparingLong(a -> a.bytes));
        for (Artifact a : ordered) {
            VendorRuntime runtime = VendorRuntime.forFormat(a.format);
            String why = runtime == null ? "no phone runtime reads " + a.format + " files" : reason(a, runtime, builtWith.get(runtime));
            (why == null ? usable : rest).add(new Candidate(a, runtime, why));
        }
        usable.addAll(rest);
        return usable;
    }

    private static int rank(String format) {
        int i = FALLBACK_ORDER.indexOf(format);
        return i < 0 ? FALLBACK_ORDER.size() : i;
    }

    private static String reason(Artifact a, VendorRuntime runtime, Version app) {
        if (app == null) return "this app was built without " + runtime.androidLibrary;
        if (Boolean.FALSE.equals(a.parityPassed)) return "it failed its parity gate at export";
        Artifact.VendorCheck check = a.vendorCheck;
        if (check == null) return "the export did not run it in " + runtime.checkedPackage + " (exported with --no-vendor-check?)";
        if (!check.passed()) return runtime.checkedPackage + " " + check.version + " did not pass it at export: " + check.result;
        if (!check.packageName.equals(runtime.checkedPackage)) {
            return "checked with " + check.packageName + ", not " + runtime.checkedPackage;
        }
        Version checked;
        try {
            checked = Version.parse(check.version);
        } catch (BundleException e) {
            return "its vendor check recorded no readable version: " + e.getMessage();
        }
        if (!app.runs(checked)) {
            return "made for " + runtime.checkedPackage + " " + checked + "; this app has " + app
                    + (app.compareTo(checked) < 0 ? " (older: update the app's " + runtime.androidLibrary + ")"
                    : " (another release line: re-export with a matching edgelm)");
        }
        return null;
    }

    /** The first usable candidate that loads; BundleException with every reason when none does. */
    public static <T> Loaded<T> loadFirst(List<Candidate> plan, Loader<T> loader) throws BundleException {
        List<String> notes = new ArrayList<>();
        for (Candidate c : plan) {
            if (!c.usable()) notes.add(c.toString());
        }
        for (Candidate c : plan) {
            if (!c.usable()) continue;
            try {
                return new Loaded<>(c, loader.load(c), notes);
            } catch (Exception | LinkageError e) {  // UnsatisfiedLinkError: a native library missing for this ABI
                notes.add(c.artifact.name + ": " + c.runtime.androidLibrary + " could not load it: " + e);
            }
        }
        throw new BundleException("no artifact of this bundle runs here — " + String.join("; ", notes));
    }
}
