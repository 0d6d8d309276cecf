package dev.edgelm.sample

import ai.djl.huggingface.tokenizers.HuggingFaceTokenizer
import android.app.Activity
import android.os.Bundle
import android.widget.Button
import android.widget.EditText
import android.widget.TextView
import dev.edgelm.bundle.ArtifactChooser
import dev.edgelm.bundle.BundleManifest
import dev.edgelm.bundle.IntegrityCheck
import dev.edgelm.bundle.SamplingSettings
import java.io.File
import java.nio.file.Paths
import kotlin.concurrent.thread
import kotlin.random.Random

/**
 * Loads a bundle from `edgelm export --target android` (pushed with `edgelm push BUNDLE
 * --device adb:SERIAL`, default /data/local/tmp/edgelm/<bundle>; or pass the folder as the
 * intent extra "bundle"), verifies the files it will open, picks the artifact this build can
 * run (ArtifactChooser's stated order), and streams a greedy or sampled generation with
 * decode tok/s and time to first token.
 */
class MainActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        val status = findViewById<TextView>(R.id.status)
        val output = findViewById<TextView>(R.id.output)
        val metrics = findViewById<TextView>(R.id.metrics)
        val folder = File(intent.getStringExtra("bundle") ?: "/data/local/tmp/edgelm/smollm2")
        findViewById<Button>(R.id.generate).setOnClickListener {
            val prompt = findViewById<EditText>(R.id.prompt).text.toString()
            output.text = ""
            thread {
                try {
                    generate(folder, prompt, { text -> runOnUiThread { output.append(text) } },
                        { line -> runOnUiThread { metrics.text = line } }, { line -> runOnUiThread { status.text = line } })
                } catch (e: Exception) {
                    runOnUiThread { status.text = "error: ${e.message}" }
                }
            }
        }
    }

    private fun generate(folder: File, prompt: String, emit: (String) -> Unit, report: (String) -> Unit, say: (String) -> Unit) {
        val bundle = Paths.get(folder.path)
        val manifest = BundleManifest.read(bundle)
        val artifact = ArtifactChooser.choose(manifest, AVAILABLE_RUNTIMES)
        say("verifying ${artifact.name}…")
        IntegrityCheck.verify(bundle, manifest, artifact)
        val tokenizer = HuggingFaceTokenizer.newInstance(bundle.resolve(manifest.tokenizerPath).resolve("tokenizer.json"))
        val text = if (manifest.hasChatTemplate) "<|im_start|>user\n$prompt<|im_end|>\n<|im_start|>assistant\n" else prompt
        val ids = tokenizer.encode(text, false, false).ids
        val settings = manifest.sampling
        say("${artifact.name} on ${artifact.runtime} (${artifact.bytes / 1_000_000} MB, max context ${artifact.maxContext})")
        openDecoder(artifact.runtime, bundle.resolve(artifact.path).toFile()).use { decoder ->
            val start = System.nanoTime()
            var logits = decoder.prefill(ids)
            val ttft = (System.nanoTime() - start) / 1e9
            val produced = ArrayList<Long>()
            val decodeStart = System.nanoTime()
            var shown = ""
            while (produced.size < settings.maxNewTokens && ids.size + produced.size < artifact.maxContext) {
                val next = sample(logits, settings, produced)
                if (isStop(tokenizer, next)) break
                produced.add(next)
                val decoded = tokenizer.decode(produced.toLongArray(), true)
                emit(decoded.substring(shown.length.coerceAtMost(decoded.length)))
                shown = decoded
                logits = decoder.decode(next)
                val seconds = (System.nanoTime() - decodeStart) / 1e9
                report("TTFT %.2f s · decode %.1f tok/s · %d tokens".format(ttft, produced.size / seconds, produced.size))
            }
        }
    }

    private fun isStop(tokenizer: HuggingFaceTokenizer, id: Long): Boolean =
        tokenizer.decode(longArrayOf(id), false).let { it == "<|im_end|>" || it == "<|endoftext|>" || it == "</s>" }

    /** Greedy at temperature 0; otherwise repetition penalty, temperature, top-k, top-p (as edgelm.sampling). */
    private fun sample(logits: FloatArray, s: SamplingSettings, history: List<Long>): Long {
        val scores = logits.copyOf()
        if (s.repetitionPenalty != 1.0) for (id in history.toSet()) {
            val i = id.toInt()
            scores[i] = if (scores[i] > 0) (scores[i] / s.repetitionPenalty).toFloat() else (scores[i] * s.repetitionPenalty).toFloat()
        }
        if (s.greedy()) return scores.indices.maxBy { scores[it] }.toLong()
        var order = scores.indices.sortedByDescending { scores[it] }
        if (s.topK > 0) order = order.take(s.topK)
        val max = scores[order[0]]
        val weights = order.map { Math.exp(((scores[it] - max) / s.temperature)) }
        val total = weights.sum()
        var kept = 0
        var mass = 0.0
        while (kept < order.size && mass < s.topP * total) { mass += weights[kept]; kept++ }
        var pick = Random.nextDouble() * mass
        for (i in 0 until kept) { pick -= weights[i]; if (pick <= 0) return order[i].toLong() }
        return order[kept - 1].toLong()
    }
}
