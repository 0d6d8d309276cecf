package dev.edgelm.bundle;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/** sha256 of the bundle's files against the manifest, before any runtime parses them. */
public final class IntegrityCheck {
    private IntegrityCheck() {
    }

    public static String sha256(Path file) throws IOException {
        MessageDigest digest;
        try {
            digest = MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
        byte[] buffer = new byte[1 << 20];
        try (InputStream in = Files.newInputStream(file)) {
            for (int n; (n = in.read(buffer)) > 0; ) digest.update(buffer, 0, n);
        }
        StringBuilder hex = new StringBuilder();
        for (byte b : digest.digest()) hex.append(String.format("%02x", b));
        return hex.toString();
    }

    /** Verify the files the app will open (the artifact, its vendor runtime's files, the tokenizer); throw listing the problems. */
    public static void verify(Path bundle, BundleManifest manifest, Artifact artifact) throws BundleException {
        List<String> problems = new ArrayList<>();
        for (Map.Entry<String, String> entry : manifest.files.entrySet()) {
            String rel = entry.getKey();
            boolean needed = rel.startsWith(manifest.tokenizerPath + "/") || rel.equals(artifact.path)
                    || rel.startsWith(artifact.path + ".")
                    || (artifact.vendorCheck != null && artifact.vendorCheck.files.contains(rel));
            if (!needed) continue;
            Path file = bundle.resolve(rel).normalize();
            if (!file.startsWith(bundle.normalize())) {
                problems.add(rel + " points outside the bundle");
                continue;
            }
            try {
                if (!Files.isRegularFile(file)) problems.add(rel + " is missing");
                else if (!sha256(file).equals(entry.getValue())) problems.add(rel + " does not match its sha256");
            } catch (IOException e) {
                problems.add(rel + " cannot be read (" + e.getMessage() + ")");
            }
        }
        if (!problems.isEmpty()) {
            throw new BundleException("bundle " + bundle + ": " + String.join("; ", problems) + " — push it again");
        }
    }
}
