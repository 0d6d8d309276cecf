package dev.edgelm.bundle;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;

import java.io.IOException;
import java.io.Reader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * manifest.json of a bundle written by `edgelm export` (schema version 1): the source model,
 * tokenizer location, generation defaults, artifacts, and the sha256 of every file.
 * Parsing is strict about what the app relies on, so a change to the bundle format that would
 * break the app fails here (and in the contract test) rather than on a phone.
 */
public final class BundleManifest {
    public static final int SCHEMA_VERSION = 1;

    public final String modelId;
    public final String target;
    public final String tokenizerPath;
    public final boolean hasChatTemplate;
    public final SamplingSettings sampling;
    /** Stop tokens, for runtimes that are told them (ExecuTorch's .pte carries its own). */
    public final int[] eosTokenIds;
    /** The BOS id the tokenizer puts in front of every text itself, or null. */
    public final Integer tokenizerAddsBosId;
    public final ChatTurns chat;
    public final List<Artifact> artifacts;
    /** Relative path (POSIX) to sha256, for every file of the bundle but manifest.json. */
    public final Map<String, String> files;

    private BundleManifest(String modelId, String target, String tokenizerPath, boolean hasChatTemplate,
                           SamplingSettings sampling, int[] eosTokenIds, Integer tokenizerAddsBosId, ChatTurns chat,
                           List<Artifact> artifacts, Map<String, String> files) {
        this.modelId = modelId;
        this.target = target;
        this.tokenizerPath = tokenizerPath;
        this.hasChatTemplate = hasChatTemplate;
        this.sampling = sampling;
        this.eosTokenIds = eosTokenIds.clone();
        this.tokenizerAddsBosId = tokenizerAddsBosId;
        this.chat = chat;
        this.artifacts = Collections.unmodifiableList(artifacts);
        this.files = Collections.unmodifiableMap(files);
    }

    public static BundleManifest read(Path bundle) throws BundleException {
        Path path = bundle.resolve("manifest.json");
        if (!Files.isRegularFile(path)) {
            throw new BundleException(bundle + ": no manifest.json; push a bundle made by `edgelm export`");
        }
        try (Reader reader = Files.newBufferedReader(path, StandardCharsets.UTF_8)) {
            return parse(JsonParser.parseReader(reader));
        } catch (IOException | JsonParseException | IllegalStateException e) {
            throw new BundleException(path + ": not valid JSON (" + e.getMessage() + "); re-push the bundle", e);
        }
    }

    public static BundleManifest parse(String json) throws BundleException {
        try {
            return parse(JsonParser.parseString(json));
        } catch (JsonParseException e) {
            throw new BundleException("manifest.json is not valid JSON: " + e.getMessage(), e);
        }
    }

    private static BundleManifest parse(JsonElement root) throws BundleException {
        JsonObject m = Json.object(root, "the manifest");
        int version = Json.integer(m, "schema_version");
        if (version != SCHEMA_VERSION) {
            throw new BundleException("manifest.json has schema version " + version + "; this app reads version "
                    + SCHEMA_VERSION + " — update the app or re-export with a matching edgelm");
        }
        JsonObject source = Json.object(m, "source");
        JsonObject tokenizer = Json.object(m, "tokenizer");
        JsonObject generation = Json.object(m, "generation");
        SamplingSettings sampling;
        try {
            sampling = new SamplingSettings(
                    Json.number(generation, "temperature", 0.0), (int) Json.number(generation, "max_new_tokens", 256),
                    Json.number(generation, "repetition_penalty", 1.0), Json.number(generation, "top_p", 1.0),
                    (int) Json.number(generation, "top_k", 0));
        } catch (IllegalArgumentException e) {
            throw new BundleException("manifest.json generation defaults: " + e.getMessage(), e);
        }
        List<Artifact> artifacts = new ArrayList<>();
        for (JsonElement element : Json.array(m, "artifacts")) {
            artifacts.add(artifact(Json.object(element, "an entry of 'artifacts'")));
        }
        Map<String, String> files = new LinkedHashMap<>();
        JsonObject fileList = Json.object(m, "files");
        for (String path : fileList.keySet()) {
            files.put(path, Json.string(fileList, path));
        }
        for (Artifact a : artifacts) {
            if (!files.containsKey(a.path)) {
                throw new BundleException("manifest.json: artifact " + a.name + " (" + a.path + ") is not in its files list");
            }
            if (a.vendorCheck != null) {
                for (String extra : a.vendorCheck.files) {
                    if (!files.containsKey(extra)) {
                        throw new BundleException("manifest.json: " + a.name + "'s runtime file " + extra + " is not in its files list");
                    }
                }
            }
        }
        Boolean chatTemplate = Json.optionalBoolean(tokenizer, "chat_template");
        return new BundleManifest(Json.string(source, "model_id"), Json.string(m, "target"), Json.string(tokenizer, "path"),
                Boolean.TRUE.equals(chatTemplate), sampling, Json.integers(generation, "eos_token_ids"),
                Json.optionalInteger(generation, "tokenizer_adds_bos_id"),
                ChatTurns.parse(Json.optionalObject(generation, "chat")), artifacts, files);
    }

    private static Artifact artifact(JsonObject a) throws BundleException {
        JsonObject signature = Json.optionalObject(a, "signature");
        JsonObject parity = Json.optionalObject(a, "parity");
        JsonObject profile = Json.optionalObject(a, "profile");
        Artifact.VendorCheck check = null;
        JsonArray vendors = a.has("vendor_runtimes") ? Json.array(a, "vendor_runtimes") : new JsonArray();
        if (vendors.size() > 0) {
            JsonObject v = Json.object(vendors.get(0), "an entry of 'vendor_runtimes'");
            check = new Artifact.VendorCheck(Json.string(v, "package"), Json.string(v, "version"),
                    Json.string(v, "result"), Json.strings(v, "files"));
        }
        double bytes = Json.number(a, "bytes", -1);
        return new Artifact(
                Json.string(a, "name"), Json.string(a, "format"), Json.string(a, "path"), Json.string(a, "sha256"),
                (long) bytes, Json.string(a, "quant"), Json.string(a, "runtime"),
                signature == null ? 0 : (int) Json.number(signature, "max_context", 0),
                parity == null ? null : Json.optionalBoolean(parity, "passed"),
                profile == null ? 0.0 : Json.number(profile, "decode_tok_s", 0.0), check);
    }
}
