package dev.edgelm.sample

import android.app.Activity
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.TextView
import dev.edgelm.bundle.ArtifactChooser
import dev.edgelm.bundle.BundleManifest
import dev.edgelm.bundle.IntegrityCheck
import dev.edgelm.bundle.VendorRuntime
import dev.edgelm.bundle.Version
import java.nio.file.Path
import java.nio.file.Paths
import java.util.EnumMap
import java.util.concurrent.Executors

/**
 * A chat screen over a bundle from `edgelm export --target android` (pushed with `edgelm push
 * BUNDLE --device adb:SERIAL`, default /data/local/tmp/edgelm/<bundle>; or pass the folder as
 * the intent extra "bundle").
 *
 * Once, on a worker thread: read the manifest, order the artifacts this build can run
 * (ArtifactChooser: runtime present, version compatible, gates and vendor check passed), verify
 * and open the first that loads in its vendor's LLM runtime, falling back to the next on any
 * failure — a missing native library included — and show which one runs and why the others do
 * not. Then every Send streams one answer from the same session (multi-turn: the runtime keeps
 * the history), with time to first token and decode tok/s; Stop ends it; one answer at a time.
 */
class MainActivity : Activity() {
    private val worker = Executors.newSingleThreadExecutor() // every runtime call happens here, in order
    @Volatile private var engine: ChatEngine? = null
    @Volatile private var busy = false

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        val status = findViewById<TextView>(R.id.status)
        val transcript = findViewById<TextView>(R.id.output)
        val metrics = findViewById<TextView>(R.id.metrics)
        val send = findViewById<Button>(R.id.generate)
        val stop = findViewById<Button>(R.id.stop)
        val prompt = findViewById<EditText>(R.id.prompt)
        val folder = Paths.get(intent.getStringExtra("bundle") ?: "/data/local/tmp/edgelm/smollm2")

        fun ready(on: Boolean) = runOnUiThread {
            send.isEnabled = on
            stop.isEnabled = !on && engine != null
        }
        ready(false)
        status.text = "loading $folder…"
        worker.execute {
            try {
                val (opened, text) = open(folder)
                engine = opened
                runOnUiThread { status.text = text }
                ready(true)
            } catch (e: Throwable) { // an Error (UnsatisfiedLinkError, OutOfMemoryError) must not kill the app either
                runOnUiThread { status.text = "cannot run this bundle: ${e.message ?: e}" }
            }
        }
        send.setOnClickListener {
            val chat = engine ?: return@setOnClickListener
            val user = prompt.text.toString().trim()
            if (busy || user.isEmpty()) return@setOnClickListener // a double tap sends once
            busy = true
            ready(false)
            prompt.setText("")
            transcript.append("\n\nYou: $user\nModel: ")
            worker.execute {
                val start = System.nanoTime()
                var first = 0L
                var pieces = 0
                try {
                    chat.send(user) { piece ->
                        if (pieces++ == 0) first = System.nanoTime()
                        runOnUiThread { transcript.append(piece) }
                    }
                    val ttft = (first - start) / 1e9
                    val decode = if (pieces > 1) (pieces - 1) / ((System.nanoTime() - first) / 1e9) else 0.0
                    runOnUiThread {
                        metrics.text = if (pieces == 0) "no output" else "TTFT %.2f s · decode %.1f pieces/s · %d pieces".format(ttft, decode, pieces)
                    }
                } catch (e: Throwable) {
                    runOnUiThread { transcript.append("\n[error: ${e.message ?: e}]") }
                } finally {
                    busy = false
                    ready(true)
                }
            }
        }
        stop.setOnClickListener { engine?.stop() } // from the UI thread: ends the worker's send()
    }

    /** The first artifact that verifies and loads, and the status line saying what runs and why not the others. */
    private fun open(bundle: Path): Pair<ChatEngine, String> {
        val manifest = BundleManifest.read(bundle)
        val plan = ArtifactChooser.plan(manifest, builtWith())
        val loaded = ArtifactChooser.loadFirst(plan) { candidate ->
            IntegrityCheck.verify(bundle, manifest, candidate.artifact) // the files it opens, hashed once per load
            openEngine(bundle, manifest, candidate)
        }
        val artifact = loaded.candidate.artifact
        val skipped = if (loaded.notes.isEmpty()) "" else "\nnot used: " + loaded.notes.joinToString("; ")
        return loaded.session to "${artifact.name} (${artifact.bytes / 1_000_000} MB) in ${loaded.session.label}$skipped"
    }

    private fun openEngine(bundle: Path, manifest: BundleManifest, candidate: ArtifactChooser.Candidate): ChatEngine {
        val artifact = candidate.artifact
        val files = artifact.vendorCheck?.files.orEmpty()
        return when (candidate.runtime) {
            VendorRuntime.EXECUTORCH -> ExecuTorchChat(
                bundle.resolve(artifact.path).toString(),
                bundle.resolve(manifest.tokenizerPath).resolve("tokenizer.json").toString(),
                manifest,
                artifact.maxContext,
            )
            VendorRuntime.LITERT_LM -> LiteRtLmChat(
                bundle.resolve(files.first { it.endsWith(".litertlm") }).toString(),
                cacheDir.path,
            )
            VendorRuntime.ORT_GENAI -> OrtGenAiChat(
                bundle.resolve(files.first { it.endsWith("genai_config.json") }).parent.toString(),
                manifest,
                artifact.maxContext,
            )
            else -> error("this app has no ${candidate.runtime} engine")
        }
    }

    /** The vendor runtimes this APK was built with, at the versions in app/build.gradle.kts. */
    private fun builtWith(): Map<VendorRuntime, Version> = EnumMap<VendorRuntime, Version>(VendorRuntime::class.java).apply {
        put(VendorRuntime.EXECUTORCH, Version.parse(BuildConfig.EXECUTORCH_VERSION))
        put(VendorRuntime.LITERT_LM, Version.parse(BuildConfig.LITERT_LM_VERSION))
        put(VendorRuntime.ORT_GENAI, Version.parse(BuildConfig.ORT_GENAI_VERSION))
    }

    override fun onDestroy() {
        engine?.stop()
        worker.execute { engine?.close() } // after any running answer ends
        worker.shutdown()
        super.onDestroy()
    }
}
