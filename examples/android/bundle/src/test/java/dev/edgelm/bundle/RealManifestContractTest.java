package dev.edgelm.bundle;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Arrays;
import java.util.HashSet;

import org.junit.Test;

/**
 * The contract with `edgelm export`: reads a real bundle (its path in the system property
 * edgelm.bundle, set by tests/test_android_app.py after exporting a tiny model), verifies it
 * and picks an artifact exactly as the app does on a phone.
 */
public class RealManifestContractTest {
    @Test
    public void aBundleWrittenByEdgelmExportIsReadVerifiedAndRunnable() throws Exception {
        String location = System.getProperty("edgelm.bundle");
        if (location == null || location.isEmpty()) {
            throw new AssertionError("set -Dedgelm.bundle=PATH to a bundle written by `edgelm export` (run_tests.sh does)");
        }
        Path bundle = Paths.get(location);
        BundleManifest m = BundleManifest.read(bundle);
        assertEquals("android", m.target);
        assertFalse(m.artifacts.isEmpty());
        assertTrue(Files.isRegularFile(bundle.resolve(m.tokenizerPath).resolve("tokenizer.json")));
        Artifact chosen = ArtifactChooser.choose(m, new HashSet<>(Arrays.asList("llama.cpp", "executorch", "litert", "onnxruntime")));
        IntegrityCheck.verify(bundle, m, chosen);
        assertTrue(chosen.maxContext > 0);
        assertEquals(Boolean.TRUE, chosen.parityPassed);
        for (Artifact a : m.artifacts) {
            assertEquals(a.sha256, m.files.get(a.path));
        }
    }
}
