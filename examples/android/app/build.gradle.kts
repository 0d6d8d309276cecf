plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

// The vendors' Android LLM runtimes, at the release lines the exporter's vendor check ran
// (executorch 1.5.1, litert-lm 0.18.1, onnxruntime-genai 0.18.0 in edgelm's pins). The app
// reads these back through BuildConfig to decide which artifacts it can run (VendorRuntime).
val executorchVersion = "1.5.1"
val litertLmVersion = "0.18.1"
val ortGenAiVersion = "0.18.0"

android {
    namespace = "dev.edgelm.sample"
    compileSdk = 35
    defaultConfig {
        applicationId = "dev.edgelm.sample"
        minSdk = 26
        targetSdk = 35
        versionCode = 2
        versionName = "0.2.0"
        ndk { abiFilters += "arm64-v8a" } // what `edgelm export --target android` builds for
        buildConfigField("String", "EXECUTORCH_VERSION", "\"$executorchVersion\"")
        buildConfigField("String", "LITERT_LM_VERSION", "\"$litertLmVersion\"")
        buildConfigField("String", "ORT_GENAI_VERSION", "\"$ortGenAiVersion\"")
    }
    buildFeatures { buildConfig = true }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_11
        targetCompatibility = JavaVersion.VERSION_11
    }
    kotlinOptions { jvmTarget = "11" }
}

dependencies {
    implementation(project(":bundle"))
    implementation("org.pytorch:executorch-android:$executorchVersion")
    implementation("com.google.ai.edge.litertlm:litertlm-android:$litertLmVersion")
    implementation("com.microsoft.onnxruntime:onnxruntime-genai-android:$ortGenAiVersion")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0") // LiteRT-LM streams a Flow
}
