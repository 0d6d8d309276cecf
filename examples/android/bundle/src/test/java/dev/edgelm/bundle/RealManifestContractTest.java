package dev.edgelm.bundle;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertTrue;

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.EnumMap;
import java.util.List;
import java.util.Map;

import org.junit.Test;

/**
 * The contract with `edgelm export`: reads a real android-preset bundle (its path in the system
 * property edgelm.bundle, set by tests/test_android_app.py after exporting a tiny model), with
 * the vendor runtime versions installed beside that exporter (edgelm.runtimes, e.g.
 * "EXECUTORCH=1.5.1,LITERT_LM=0.18.1,ORT_GENAI=0.18.0"), and chooses, verifies and "loads"
 * exactly as the app does on a phone.
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
        assertTrue(m.eosTokenIds.length > 0);
        assertTrue(m.chat.unavailable, m.chat.available());
        assertTrue(m.chat.firstTurn("hello", false).contains("hello"));
        Map<VendorRuntime, Version> builtWith = new EnumMap<>(VendorRuntime.class);
        for (String pair : System.getProperty("edgelm.runtimes", "").split(",")) {
            if (pair.isEmpty()) continue;
            String[] kv = pair.split("=");
            builtWith.put(VendorRuntime.valueOf(kv[0]), Version.parse(kv[1]));
        }
        List<ArtifactChooser.Candidate> plan = ArtifactChooser.plan(m, builtWith);
        List<String> tried = new ArrayList<>();
        ArtifactChooser.Loaded<Path> loaded = ArtifactChooser.loadFirst(plan, c -> {
            tried.add(c.artifact.name);
            IntegrityCheck.verify(bundle, m, c.artifact);
            return bundle.resolve(c.artifact.path);
        });
        assertEquals(tried.get(0), loaded.candidate.artifact.name);  // the first usable one verified
        for (ArtifactChooser.Candidate c : plan) {
            if (c.runtime == null || !builtWith.containsKey(c.runtime)) continue;
            // every artifact whose runtime the app has is runnable: gates and vendor checks passed, versions match
            assertTrue(c + "", c.usable());
            assertNotNull(c.artifact.vendorCheck);
            assertTrue(c.artifact.maxContext > 0);
            IntegrityCheck.verify(bundle, m, c.artifact);
        }
        for (Artifact a : m.artifacts) {
            assertEquals(a.sha256, m.files.get(a.path));
        }
    }
}
