// Plain JVM: manifest parsing, sha256 check, artifact choice, sampling settings. No Android
// APIs, so CI compiles and tests it with the JDK alone (../run_tests.sh).
plugins { `java-library` }

java { toolchain { languageVersion.set(JavaLanguageVersion.of(17)) } }

dependencies {
    implementation("com.google.code.gson:gson:2.10.1")
    testImplementation("junit:junit:4.13.2")
}

tasks.test { systemProperty("edgelm.bundle", System.getProperty("edgelm.bundle") ?: "") }
