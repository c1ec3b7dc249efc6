import CoreStages
import PipeKit
import TwinStages
import IntakeStages
import AlignerStages
import CausalStages
import ExecutorStages
import GatewayStages
import MuxStages
import SlotStages

/// Every built-in stage kind, registered in this one place. `pipectl stages`, validation, the
/// JSON Schema and docs/pipeline-reference.md all read this list.
public let builtInStages = StageRegistry([
    GeneratorStage.descriptor,
    FileSourceStage.descriptor,
    PassthroughStage.descriptor,
    HopStage.descriptor,
    ExternalStage.descriptor,
    FileSinkStage.descriptor,
    NullSinkStage.descriptor,
    StdoutSinkStage.descriptor,
    TwinStage.descriptor,
    TwinSimulatorStage.descriptor,
    InboxStage.descriptor,
    SnifferStage.descriptor,
    VerifyStage.descriptor,
    MoveSinkStage.quarantine,
    MoveSinkStage.triage,
    MoveSinkStage.reject,
    ResealSinkStage.descriptor,
    PoliceStage.descriptor,
    IntakeSimStage.descriptor,
    ZmqInboxStage.descriptor,
    CausalTimeStage.descriptor,
    ExecutorStage.descriptor,
    AlignerStage.descriptor,
    SlotInjectorStage.descriptor,
    MuxStage.descriptor,
    GatewayEventsSink.descriptor,
])
